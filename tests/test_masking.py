import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import masking

N = 40_000


def _within_4_sigma(freq, p, n=N):
  assert abs(freq - p) <= 4 * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9, (freq, p)


def test_full_mask_frequency_matches_probability():
  valid = jnp.ones((N, 3), bool)
  for p in (0.0, 0.3, 1.0):
    out, masked = jax.jit(masking.meta_masks)(jax.random.PRNGKey(0), valid, p)
    rows_masked = ~out.any(1)
    assert bool(jnp.all(out.all(1) | rows_masked))  # all components of a sample together
    np.testing.assert_array_equal(masked, ~out)
    _within_4_sigma(float(rows_masked.mean()), p)


def test_partial_masking_draws_whitelist_combinations_by_weight():
  combos = ((True, False, False), (False, True, True), (True, True, False))
  weights = (1.0, 0.5, 0.5)
  p_full, p_part = 0.2, 0.6
  fn = jax.jit(lambda k, v: masking.meta_masks(k, v, p_full, p_part, combos, weights))
  _, masked = fn(jax.random.PRNGKey(3), jnp.ones((N, 3), bool))
  masked = np.asarray(masked)
  full = masked.all(1)
  _within_4_sigma(full.mean(), p_full)
  # Every other sample has exactly one whitelisted combination or nothing.
  patterns = {tuple(r) for r in masked[~full]}
  assert patterns <= set(combos) | {(False, False, False)}
  p_combo = (1 - p_full) * p_part * np.array(weights) / sum(weights)
  for combo, p in zip(combos, p_combo):
    _within_4_sigma(np.all(masked == combo, axis=1).mean(), p)


def test_masking_is_anded_into_validity():
  valid = jnp.array([[True, False, True]] * 2000)
  out, masked = masking.meta_masks(jax.random.PRNGKey(1), valid, 0.5, 0.5,
                                   ((False, True, False), (True, False, False)), (1.0, 1.0))
  assert not bool(jnp.any(out & ~valid))  # already missing stays missing
  np.testing.assert_array_equal(out, valid & ~masked)
  assert bool(jnp.any(masked[:, 0] & ~masked[:, 2]))  # partial combos really fired


def test_same_key_same_masks_other_key_other_masks():
  valid = jnp.ones((64, 3), bool)
  a = masking.meta_masks(jax.random.PRNGKey(5), valid, 0.5)[1]
  b = masking.meta_masks(jax.random.PRNGKey(5), valid, 0.5)[1]
  c = masking.meta_masks(jax.random.PRNGKey(6), valid, 0.5)[1]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
