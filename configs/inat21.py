"""mFormerV1_sm on iNaturalist 2021 (2.7M train / 100k val images, 10,000 species), built by
`python -m linnaeus_jax.data.build` (docs/data.md#building-a-dataset):

    python -m linnaeus_jax.data.build --format=inat --source=/data/inat2021/train.json \
        --val_source=/data/inat2021/val.json --images_root=/data/inat2021 \
        --partial_levels=true --out=/data/inat2021/built
    python -m linnaeus_jax.main --config=configs/inat21.py --workdir=runs/inat21 \
        --config.data.h5.train_labels_path=/data/inat2021/built/labels.h5 \
        --config.data.h5.val_labels_path=/data/inat2021/built/labels_val.h5 \
        --config.data.hybrid.images_dir=/data/inat2021

With images packed into shards (`--pack_images`), replace the last line by
`--config.data.hybrid.use_hybrid=False --config.data.h5.train_images_path='/data/inat2021/built/images-*.h5'
--config.data.h5.val_images_path='/data/inat2021/built/images_val-*.h5'`.

Choices:
- sm at 384x384: the original's default resolution (MODEL.IMG_SIZE); fine-grained species
  gain from it (the iNat-with-metadata results in the literature train at 384). At 224 a step
  costs 3.1x less (4.32 vs 13.41 GMACs): `--config.data.img_size=224` for a first run.
- The 4 ranks the original trains (species, genus, family, order; the builder's default).
  iNat 2021's higher ranks have 51 classes, 13 phyla and 3 kingdoms, each determined by the
  order: extra heads would add loss terms to balance and nothing to learn. Build with
  `--ranks=...` and set data.task_keys_h5 to train more.
- Metadata TEMPORAL (month and hour: iNat 2021 dates carry a time, so 4 columns) and SPATIAL;
  iNat has no elevation. The masking schedules are configs/sm.py's (the values of the original's
  documentation), with ELEVATION's partial-masking combinations removed.
- ImageNet initialisation (docs/finetuning.md) is the usual start: add
  `--config.model.init.convnext=... --config.model.init.ropevit=...` (and see
  configs/finetune_sm.py for freezing and layer-wise LR decay).
"""

from linnaeus_jax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "sm.py")
  d = c.data
  d.hybrid.use_hybrid = True  # images in their folder (identifiers relative to images_dir)
  d.img_size = 384
  d.batch_size = 256  # global; split over all devices
  d.batch_size_val = 512
  d.num_workers = 8  # Grain decoding processes per host
  d.meta.components.TEMPORAL.dim = 4  # month sin/cos, hour sin/cos
  d.meta.components.ELEVATION.enabled = False
  pm = c.schedule.meta_masking.partial
  pm.whitelist = (("TEMPORAL",), ("SPATIAL",), ("TEMPORAL", "SPATIAL"))
  pm.weights = (1.0, 1.0, 0.5)
  c.lr_scheduler.scale_by_batch = True  # base_lr is for reference_bs 512
  c.train.epochs = 30.0
  c.schedule.validation.interval_epochs = 1.0
  c.schedule.validation.mask_meta_interval_epochs = 2.0
  c.schedule.checkpoint.interval_epochs = 1.0
  c.schedule.metrics.console_interval = 100
  return c
