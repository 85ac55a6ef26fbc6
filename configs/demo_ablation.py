"""The demo with SPATIAL-masked validation, with or without partial metadata masking in training
(docs/experiments.md):

    python -m linnaeus_jax.main --config=configs/demo_ablation.py:full --workdir=runs/full
    python -m linnaeus_jax.main --config=configs/demo_ablation.py:partial --workdir=runs/partial
"""

import importlib.util
import os


def _demo():
  spec = importlib.util.spec_from_file_location(
      "demo", os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config(variant: str = "full"):
  c = _demo()
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
