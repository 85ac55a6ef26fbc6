import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linnaeus_jax import config as config_lib
from linnaeus_jax.data import augment


def _img():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("op", sorted(augment.OPS))
def test_every_op_keeps_shape_and_dtype(op):
  from PIL import Image
  out = np.asarray(augment.OPS[op](Image.fromarray(_img()), 9, np.random.default_rng(1)))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_op_magnitudes_by_hand():
  from PIL import Image
  img = Image.fromarray(_img())
  inv = np.asarray(augment.OPS["Invert"](img, 0, None))
  np.testing.assert_array_equal(inv, 255 - _img())
  sol = np.asarray(augment.OPS["Solarize"](img, 5, None))  # threshold 256 - 128 = 128
  np.testing.assert_array_equal(sol, np.where(_img() >= 128, 255 - _img(), _img()))


def test_policies_are_deterministic_given_the_generator():
  for policy in ("original", "rand-m9-n2"):
    a = augment.apply_policy(_img(), policy, np.random.default_rng([1, 2, 3]))
    b = augment.apply_policy(_img(), policy, np.random.default_rng([1, 2, 3]))
    np.testing.assert_array_equal(a, b)
  assert augment.apply_policy(_img(), "none", None) is not None
  changed = [not np.array_equal(augment.apply_policy(_img(), "rand-m9-n2",
                                                     np.random.default_rng(s)), _img())
             for s in range(10)]
  assert sum(changed) >= 8
  assert config_lib.autoaug_policy_problem("rand-m9-n2") is None
  assert config_lib.autoaug_policy_problem("rand-m2.5-n1") is None
  assert "expected" in config_lib.autoaug_policy_problem("randaug")


def test_random_erasing_box_statistics():
  x = jnp.full((4000, 16, 16, 3), 0.5)
  out = augment.random_erasing(jax.random.PRNGKey(0), x, 0.25, mode="const")
  erased = (out == 0).all(-1)
  frac_samples = float(erased.any((1, 2)).mean())
  assert abs(frac_samples - 0.25) < 0.03
  area = erased.sum((1, 2))[erased.any((1, 2))] / 256.0
  assert 0.01 <= float(area.min()) and float(area.max()) <= 0.5  # area in [0.02, 0.4] +rounding
  assert 0.15 < float(area.mean()) < 0.25  # E[U(0.02, 0.4)] = 0.21 before clipping
  # Boxes are rectangles: the erased rows of a sample all span the same columns.
  one = np.asarray(erased[np.flatnonzero(np.asarray(erased.any((1, 2))))[0]])
  rows = np.flatnonzero(one.any(1))
  assert all(np.array_equal(one[r], one[rows[0]]) for r in rows)
  masked = augment.random_erasing(jax.random.PRNGKey(0), x, 1.0, mask_B=jnp.zeros(4000, bool))
  np.testing.assert_array_equal(masked, x)
