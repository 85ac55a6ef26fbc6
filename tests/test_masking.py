import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import masking

from conftest import tiny_config


def test_ramp_closed_form():
  got = [float(masking.ramp(s, 1.0, 0.2, 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(got, [1.0, 0.6, 0.2, 0.2], rtol=1e-6)


def test_schedule_resolves_its_end_once(small_dataset):
  c = tiny_config(small_dataset[0])
  c.schedule.meta_masking.end_fraction = 0.5
  s = masking.MetaMaskSchedule.from_config(c, total_steps=200, steps_per_epoch=10)
  assert s.end_step == 100
  c.schedule.meta_masking.end_steps = 30  # explicit steps beat the fraction
  assert masking.MetaMaskSchedule.from_config(c, 200, 10).end_step == 30
  c.schedule.meta_masking.enabled = False
  assert float(masking.MetaMaskSchedule.from_config(c, 200, 10).prob(0)) == 0.0


def test_full_mask_frequency_matches_probability():
  valid = jnp.ones((20000, 3), bool)
  for p in (0.0, 0.3, 1.0):
    out = jax.jit(masking.full_mask)(jax.random.PRNGKey(0), valid, p)
    rows_masked = ~out.any(1)
    assert bool(jnp.all(out.all(1) | rows_masked))  # all components of a sample together
    assert abs(float(rows_masked.mean()) - p) < 0.015


def test_masking_only_clears_flags():
  valid = jnp.array([[True, False, True]] * 1000)
  out = masking.full_mask(jax.random.PRNGKey(1), valid, 0.5)
  assert not bool(jnp.any(out & ~valid))
