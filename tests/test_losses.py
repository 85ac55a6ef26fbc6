import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import losses

LOGITS = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])


def _lse(row):
  return np.log(np.sum(np.exp(row)))


def test_cross_entropy_closed_form():
  y = jax.nn.one_hot(jnp.array([0, 2]), 3)
  got = losses.cross_entropy(LOGITS, y, 0.1)  # smoothing is ignored by plain CE
  np.testing.assert_allclose(got, [_lse([2, 0, -1]) - 2.0, _lse([0.5, 0.5, 3]) - 3.0], rtol=1e-6)


def test_label_smoothing_closed_form():
  y = jax.nn.one_hot(jnp.array([0]), 3)
  got = losses.label_smoothing_ce(LOGITS[:1], y, 0.1)
  logp = np.array([2, 0, -1]) - _lse([2, 0, -1])
  np.testing.assert_allclose(got, [-(0.9 * logp[0] + 0.05 * logp[1] + 0.05 * logp[2])], rtol=1e-6)


def test_soft_targets_and_argmax_of_plain_ce():
  y = jnp.array([[0.3, 0.7, 0.0]])
  logp = np.array([2, 0, -1]) - _lse([2, 0, -1])
  soft = losses.LOSSES["SoftTargetCrossEntropy"](LOGITS[:1], y, 0.0)
  np.testing.assert_allclose(soft, [-(0.3 * logp[0] + 0.7 * logp[1])], rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(LOGITS[:1], y, 0.0), [-logp[1]], rtol=1e-6)


def test_null_masking_and_task_weights():
  logits = {"a": LOGITS, "b": LOGITS}
  labels = {"a": jnp.array([0, 2]), "b": jnp.array([1, 2])}
  kw = dict(smoothing=0.0, partial_levels=True)
  keep = losses.task_losses(logits, labels, ["a", "b"], ["CrossEntropyLoss"] * 2,
                            mask_nulls=False, **kw)
  masked = losses.task_losses(logits, labels, ["a", "b"], ["CrossEntropyLoss"] * 2,
                              mask_nulls=True, **kw)
  per = keep["a"][1]
  np.testing.assert_allclose(keep["a"][0], per.mean(), rtol=1e-6)
  np.testing.assert_allclose(masked["a"][0], per[1], rtol=1e-6)  # the null sample is excluded
  np.testing.assert_allclose(masked["b"][0], keep["b"][0], rtol=1e-6)  # no null in task b
  total = losses.total_loss(masked, ["a", "b"], [2.0, 0.5])
  np.testing.assert_allclose(total, 2.0 * masked["a"][0] + 0.5 * masked["b"][0], rtol=1e-6)
  # Without partial levels class 0 is a real taxon and nothing is masked.
  no_partial = losses.task_losses(logits, labels, ["a"], ["CrossEntropyLoss"], smoothing=0.0,
                                  partial_levels=False, mask_nulls=True)
  np.testing.assert_allclose(no_partial["a"][0], per.mean(), rtol=1e-6)


def test_all_excluded_gives_zero_not_nan():
  out = losses.task_losses({"a": LOGITS}, {"a": jnp.array([0, 0])}, ["a"], ["CrossEntropyLoss"],
                           smoothing=0.0, partial_levels=True, mask_nulls=True)
  assert float(out["a"][0]) == 0.0
