"""mFormerV1_sm (reference/model.md §2) on a labels.h5 dataset at 384x384.

    python -m linnaeus_jax.main --config=configs/sm.py --workdir=DIR \
        --config.data.h5.labels_path=/data/labels.h5 --config.data.hybrid.use_hybrid=True \
        --config.data.hybrid.images_dir=/data/images
"""

from linnaeus_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  m = c.model
  m.convnext_stages.depths = [3, 3]
  m.convnext_stages.dims = [96, 192, 384, 768]
  m.rope_stages.depths = [5, 2]
  m.rope_stages.dims = [384, 768]
  m.rope_stages.num_heads = [6, 12]
  m.rope_stages.mlp_ratio = [4.0, 4.0]
  m.drop_path_rate = 0.2
  c.data.img_size = 384
  c.data.batch_size = 64
  c.data.batch_size_val = 128
  # The original ramps full metadata masking 1.0 -> 0.0 but gives no end (it fell back to 5000
  # steps); an end is required here.
  c.schedule.meta_masking.end_fraction = 0.3
  return c
