import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from linnaeus_jax import config as config_lib, schedules

from conftest import tiny_config


def test_ramp_closed_form():
  got = [float(schedules.ramp(s, 1.0, 0.2, 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(got, [1.0, 0.6, 0.2, 0.2], rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(p0=st.floats(0, 1), p1=st.floats(0, 1), end=st.integers(1, 10_000),
       steps=st.lists(st.integers(0, 20_000), min_size=2, max_size=8))
def test_ramp_is_monotone_and_clamped(p0, p1, end, steps):
  steps = sorted(steps)
  vals = np.array([float(schedules.ramp(s, p0, p1, end)) for s in steps])
  lo, hi = min(p0, p1), max(p0, p1)
  assert np.all(vals >= lo - 1e-6) and np.all(vals <= hi + 1e-6)
  diffs = np.diff(vals) * (1 if p1 >= p0 else -1)
  assert np.all(diffs >= -1e-6)  # monotone from p0 towards p1
  assert all(abs(v - p1) < 1e-6 for s, v in zip(steps, vals) if s >= end)


def _config(small_dataset):
  c = tiny_config(small_dataset[0])
  pm = c.schedule.meta_masking.partial
  pm.enabled = True
  pm.start_fraction, pm.end_fraction, pm.prob_end_fraction = 0.1, 0.9, 0.5
  pm.start_prob, pm.end_prob = 0.01, 0.7
  pm.whitelist = [["TEMPORAL"], ["SPATIAL", "ELEVATION"]]
  pm.weights = [1.0, 0.5]
  c.schedule.meta_masking.start_prob, c.schedule.meta_masking.end_prob = 1.0, 0.05
  c.schedule.meta_masking.end_fraction = 0.3
  c.schedule.null_masking.enabled = True
  c.schedule.null_masking.end_steps = 400
  c.schedule.mix.prob.enabled = True
  c.schedule.mix.prob.end_fraction = 0.5
  return c


def test_every_schedule_at_chosen_steps(small_dataset):
  s = schedules.Schedules.from_config(_config(small_dataset), total_steps=1000,
                                      steps_per_epoch=10)
  assert (s.meta_mask.end_step, s.partial_start, s.partial_end, s.partial.end_step) == (
      300, 100, 900, 500)
  assert s.combos_KxC == ((True, False, False), (False, True, True))  # TEMPORAL, SPATIAL, ELEV.
  assert s.combo_weights == (1.0, 0.5)
  v = {k: jax.device_get(f) for k, f in s.values(150).items()}
  np.testing.assert_allclose(v["schedule/meta_mask_prob"], 1.0 - 0.95 * 150 / 300, rtol=1e-6)
  # The partial probability ramps from step 0 (not from the window start), and is 0 outside.
  np.testing.assert_allclose(v["schedule/partial_mask_prob"], 0.01 + 0.69 * 150 / 500, rtol=1e-6)
  np.testing.assert_allclose(v["schedule/null_incl_prob"], 150 / 400, rtol=1e-6)
  np.testing.assert_allclose(v["schedule/mix_prob"], 1.0 - 0.8 * 150 / 500, rtol=1e-6)
  assert float(s.partial_prob(99)) == 0.0 and float(s.partial_prob(900)) == 0.0
  np.testing.assert_allclose(float(s.partial_prob(899)), 0.7, rtol=1e-6)
  assert float(s.meta_mask(999)) == pytest.approx(0.05)


def test_disabled_schedules_and_precedence(small_dataset):
  c = tiny_config(small_dataset[0])
  s = schedules.Schedules.from_config(c, 200, 10)
  assert float(s.null_keep(5)) == 1.0  # disabled: every null label kept
  assert float(s.mix(5)) == 0.0 and float(s.partial_prob(5)) == 0.0
  c.schedule.meta_masking.end_fraction = 0.5
  assert schedules.Schedules.from_config(c, 200, 10).meta_mask.end_step == 100
  c.schedule.meta_masking.end_steps = 30  # one member of a duration: two is an error
  with pytest.raises(config_lib.ConfigError, match="end_steps=30 and schedule.meta_masking."
                     r"end_fraction=0.5 are both set: set one \(0 unsets\)"):
    schedules.Schedules.from_config(c, 200, 10)
  c.schedule.meta_masking.end_fraction = 0.0
  assert schedules.Schedules.from_config(c, 200, 10).meta_mask.end_step == 30
  c.schedule.meta_masking.end_steps = 0  # none set: DURATIONS' default, 30% of training
  assert schedules.Schedules.from_config(c, 200, 10).meta_mask.end_step == 60
  c.schedule.meta_masking.enabled = False
  assert float(schedules.Schedules.from_config(c, 200, 10).meta_mask(0)) == 0.0


def test_partial_masking_window_and_ramp_are_durations(small_dataset):
  c = _config(small_dataset)
  pm = c.schedule.meta_masking.partial
  pm.start_fraction, pm.start_steps = 0.0, 50  # steps instead of the fraction
  pm.end_fraction, pm.end_steps = 0.0, 700
  pm.prob_end_fraction = 0.0  # unset: DURATIONS' default, half of training
  s = schedules.Schedules.from_config(c, total_steps=1000, steps_per_epoch=10)
  assert (s.partial_start, s.partial_end, s.partial.end_step) == (50, 700, 500)
  pm.start_steps = 0  # unset, no default: the window opens at step 0
  assert schedules.Schedules.from_config(c, 1000, 10).partial_start == 0
  pm.enabled = False
  assert schedules.Schedules.from_config(c, 1000, 10).partial_end == 0


def test_a_ramp_without_an_end_is_a_config_error(small_dataset):
  c = tiny_config(small_dataset[0])
  c.schedule.mix.prob.enabled = True  # 1.0 -> 0.2 with no end
  with pytest.raises(config_lib.ConfigError, match="schedule.mix.prob ramps 1.0 -> 0.2"):
    schedules.Schedules.from_config(c, 200, 10)


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 500), length=st.integers(1, 500), step=st.integers(0, 1200))
def test_partial_masking_only_inside_its_window(start, length, step):
  s = schedules.Schedules(
      meta_mask=schedules.Ramp(False, 0, 0, 1), partial=schedules.Ramp(True, 0.2, 0.6, 300),
      partial_start=start, partial_end=start + length, combos_KxC=((True,),),
      combo_weights=(1.0,), null_keep=schedules.Ramp(False, 0, 0, 1, 1.0),
      mix=schedules.Ramp(False, 0, 0, 1))
  p = float(s.partial_prob(step))
  if start <= step < start + length:
    assert p == pytest.approx(0.2 + 0.4 * min(step / 300, 1.0), rel=1e-6)
  else:
    assert p == 0.0
