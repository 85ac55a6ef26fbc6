import jax.numpy as jnp
import numpy as np

from linnaeus_jax import metrics


def test_counts_by_hand():
  logits = {"a": jnp.array([[3.0, 0.0], [0.0, 1.0], [5.0, 0.0]]),
            "b": jnp.array([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])}
  labels = {"a": jnp.array([0, 0, 0]), "b": jnp.array([1, 1, 1])}
  per_task = {"a": (None, jnp.array([1.0, 2.0, 100.0]), None),
              "b": (None, jnp.array([3.0, 4.0, 100.0]), None)}
  mask = jnp.array([True, True, False])  # the third example is padding
  c = metrics.batch_counts(logits, labels, per_task, mask, ["a", "b"])
  total = metrics.accumulate(metrics.accumulate(None, c), c)
  out = metrics.finalize(total, ["a", "b"])
  assert out["num_examples"] == 4
  np.testing.assert_allclose(out["acc1/a"], 50.0)
  np.testing.assert_allclose(out["acc1/b"], 100.0)
  np.testing.assert_allclose(out["chain_accuracy"], 50.0)
  np.testing.assert_allclose(out["loss/a"], 1.5)
  np.testing.assert_allclose(out["loss"], 1.5 + 3.5)
