"""The demo on a harder synthetic task, for experiments with error bars (docs/experiments.md):
coarse ranks partly confusable from pixels, metadata informative but noisy (wider ranges and
seasons that overlap), realistic missingness (20% no date, 10% no coordinates, 40% no
elevation) and 3% of rows labelled as another species. Validation runs every single-component
masked phase and `val_mask_meta`.

    python -m linnaeus_jax.main --config=configs/demo_hard.py --workdir=runs/hard
"""

from linnaeus_jax import config as config_lib

HARD = dict(pixel_confusion=0.35, metadata_spread=1.8, label_noise_rate=0.03,
            missing_temporal_rate=0.2, missing_spatial_rate=0.1, missing_elevation_rate=0.4)


def get_config():
  c = config_lib.sibling(__file__, "demo.py")
  c.data.synthetic.options.update(HARD)
  v = c.schedule.validation.partial_mask_meta
  v.enabled, v.interval_steps = True, 250
  v.whitelist = (("TEMPORAL",), ("SPATIAL",), ("ELEVATION",))
  return c
