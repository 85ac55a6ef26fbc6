"""mFormerV1_xl (docs/model.md#sizes) on a labels.h5 dataset at 384x384.

    python -m linnaeus_jax.main --config=configs/xl.py --workdir=DIR \
        --config.data.h5.labels_path=/data/labels.h5 --config.data.hybrid.use_hybrid=True \
        --config.data.hybrid.images_dir=/data/images
"""

from linnaeus_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  config_lib.set_model_size(c, "xl")
  c.data.img_size = 384
  c.data.batch_size = 64
  c.data.batch_size_val = 128
  return c
