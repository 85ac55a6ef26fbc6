"""A tiny mFormerV1 on the built-in synthetic dataset (64x64), for a laptop CPU.

    python -m linnaeus_jax.main --config=configs/demo.py --workdir=runs/demo
"""

from linnaeus_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  d = c.data
  d.synthetic.enabled = True
  d.img_size = d.synthetic.options.img_size = 64
  d.partial.levels = True  # the synthetic data has null species / genus labels
  d.meta.components.ELEVATION.enabled = True
  d.batch_size = 64
  d.batch_size_val = 128
  c.aug.autoaug.policy = "none"  # the synthetic task needs no augmentation to generalise
  c.aug.random_erase.prob = 0.0
  m = c.model
  m.convnext_stages.depths = (1, 1)
  m.convnext_stages.dims = (32, 48, 64, 96)
  m.rope_stages.depths = (1, 1)
  m.rope_stages.dims = (64, 96)
  m.rope_stages.num_heads = (2, 3)
  m.drop_path_rate = 0.0
  c.train.steps = 500
  c.lr_scheduler.base_lr = 2e-3
  c.lr_scheduler.min_lr = 1e-5
  c.lr_scheduler.warmup_lr = 1e-5
  c.lr_scheduler.warmup_steps = 25
  c.optimizer.weight_decay = 0.05
  c.schedule.meta_masking.enabled = True
  c.schedule.meta_masking.start_prob = 0.5
  c.schedule.meta_masking.end_prob = 0.1
  c.schedule.meta_masking.end_fraction = 0.5
  c.schedule.validation.interval_steps = 100
  c.schedule.validation.mask_meta_interval_steps = 100
  c.schedule.checkpoint.interval_steps = 100
  c.schedule.metrics.console_interval = 10
  c.schedule.metrics.tensorboard_interval = 10
  return c
