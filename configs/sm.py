"""mFormerV1_sm: configs/mformer.py's recipe at the sm size (docs/model.md#sizes).

    python -m linnaeus_jax.main --config=configs/sm.py --workdir=DIR \
        --config.data.h5.labels_path=/data/labels.h5 --config.data.hybrid.use_hybrid=True \
        --config.data.hybrid.images_dir=/data/images
"""

from linnaeus_jax import config as config_lib


def get_config():
  return config_lib.sibling(__file__, "mformer.py", "sm")
