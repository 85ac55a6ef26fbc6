"""The demo with SPATIAL-masked validation, with or without partial metadata masking in training
(docs/experiments.md):

    python -m linnaeus_jax.main --config=configs/demo_ablation.py:full --workdir=runs/full
    python -m linnaeus_jax.main --config=configs/demo_ablation.py:partial --workdir=runs/partial
"""

from linnaeus_jax import config as config_lib


def get_config(variant: str = "full"):
  c = config_lib.sibling(__file__, "demo.py")
  v = c.schedule.validation.partial_mask_meta
  v.enabled, v.interval_steps, v.whitelist = True, 250, (("SPATIAL",),)
  if variant == "partial":  # also mask one component at a time in training
    pm = c.schedule.meta_masking.partial
    pm.enabled, pm.start_prob, pm.end_prob = True, 0.3, 0.3
    pm.end_fraction = 1.0
    pm.whitelist = (("TEMPORAL",), ("SPATIAL",), ("ELEVATION",))
  elif variant != "full":
    raise ValueError(f"variant {variant!r}: 'full' or 'partial'")
  return c
