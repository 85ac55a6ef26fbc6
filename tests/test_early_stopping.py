import math

import pytest

from linnaeus_jax import early_stopping as es


def test_direction_and_patience_counted_in_evaluations():
  assert es.direction("val/loss", "auto") == "min"
  assert es.direction("val/acc1/taxa_L10", "auto") == "max"
  s = es.init_state()
  s, improved = es.update(s, 1.0, 10, "min", 0.1)
  assert improved and s == {"best": 1.0, "best_step": 10, "bad_evals": 0}
  s, improved = es.update(s, 0.95, 20, "min", 0.1)  # better, but by less than min_delta
  assert not improved and s["bad_evals"] == 1 and not es.should_stop(s, 2)
  s, improved = es.update(s, 0.5, 30, "min", 0.1)
  assert improved and s["best_step"] == 30 and s["bad_evals"] == 0
  for step in (40, 50):
    s, _ = es.update(s, 0.6, step, "min", 0.0)
  assert es.should_stop(s, 2) and s["best"] == 0.5
  s, improved = es.update(es.init_state(), math.nan, 1, "max", 0.0)
  assert not improved and s["best"] is None
  s, improved = es.update(es.init_state(), 50.0, 1, "max", 0.0)
  assert improved and not es.update(s, 49.0, 2, "max", 0.0)[1]


def test_lookup_names_the_known_metrics():
  results = {"val": {"loss": 1.5, "acc1/taxa_L10": 40.0}, "val_mask_meta": {"loss": 2.0}}
  assert es.lookup(results, "val/acc1/taxa_L10") == 40.0
  assert es.lookup(results, "val_mask_meta/loss") == 2.0
  with pytest.raises(KeyError, match="val/acc1/taxa_L10"):
    es.lookup(results, "val/acc3/taxa_L10")
