import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linnaeus_jax import config as config_lib, models
from linnaeus_jax.models import rope

from conftest import ROOT, tiny_config


def _load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# The original's counts (docs/model.md#sizes): (total, metadata embedders, heads,
# learned missing tokens).
PARITY = {"sm": (31_383_022, 4_472_064, 697_483, 3_456),
          "md": (40_257_262, 4_472_064, 697_483, 3_456),
          "lg": (159_255_118, 17_791_488, 1_394_059, 6_912),
          "xl": (433_499_278, 31_586_304, 1_858_443, 9_216)}


@pytest.mark.parametrize("size", list(PARITY))
@pytest.mark.parametrize("meta_missing", ["zeros", "learned_token"])
def test_parameter_counts_match_the_original(size, meta_missing):
  """Meta [2, 3, 10], heads 684/179/40/4, image 384 (shapes only: nothing is allocated)."""
  c = _load_config(size)
  for t, n in zip(c.data.task_keys_h5, (684, 179, 40, 4)):
    c.model.classification.heads[t].num_classes = n
  c.data.meta.components.ELEVATION.enabled = True
  c.model.meta_missing = meta_missing
  model = nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0)))
  _, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  total, meta, heads, tokens = PARITY[size]
  extra = tokens if meta_missing == "learned_token" else 0
  assert _count(params) == total + extra
  assert _count(params["meta_1"]) + _count(params["meta_2"]) == meta + extra
  assert _count(params["head"]) == heads


@pytest.mark.slow
@pytest.mark.parametrize("size", list(PARITY))
def test_every_size_runs_forward(size):
  """Each size at 64x64 (params initialised inside jit): the logits' shapes; sm also computed
  (finite, per-example). md/lg/xl only differ in widths and depths: traced, not run (their
  random init alone took minutes of the suite)."""
  c = _load_config(size)
  c.data.img_size = 64
  for t, n in zip(c.data.task_keys_h5, (7, 5, 3, 2)):
    c.model.classification.heads[t].num_classes = n
  image = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3))
  comps = config_lib.enabled_components(c)
  meta = {n: jnp.ones((2, comp.dim)) for n, comp in comps}
  valid = jnp.ones((2, len(comps)), bool).at[1, 0].set(False)
  forward = lambda i, m, v: models.build(c, nnx.Rngs(0))(i, m, v)
  args = (image, meta, valid)
  out = jax.jit(forward)(*args) if size == "sm" else jax.eval_shape(forward, *args)
  assert {t: v.shape for t, v in out.items()} == {"taxa_L10": (2, 7), "taxa_L20": (2, 5),
                                                   "taxa_L30": (2, 3), "taxa_L40": (2, 2)}
  if size == "sm":
    assert all(np.isfinite(v).all() for v in out.values())
    assert not np.allclose(out["taxa_L10"][0], out["taxa_L10"][1])


def test_rope_rotation_is_relative_and_norm_preserving():
  key = jax.random.PRNGKey(0)
  freqs = rope.init_mixed_freqs(key, heads=2, head_dim=8, theta=10000.0)
  assert freqs.shape == (2, 2, 4)
  np.testing.assert_allclose(jnp.hypot(freqs[0], freqs[1]),
                             jnp.broadcast_to(10000.0 ** (-jnp.arange(0, 8, 2) / 8), (2, 4)),
                             rtol=1e-6)
  angles = rope.grid_angles(freqs, 4, 4)  # (16, 2, 4)
  q = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, 8))
  k = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 2, 8))

  def score(p, r):
    qp = rope.apply_rope(q, angles[p:p + 1])
    kr = rope.apply_rope(k, angles[r:r + 1])
    return jnp.sum(qp * kr, -1)
  # Token n sits at (x, y) = (n % 4, n // 4): (0,0)-(1,1) and (2,1)-(3,2) share the offset.
  np.testing.assert_allclose(score(0, 5), score(6, 11), rtol=1e-5, atol=1e-5)
  rotated = rope.apply_rope(jnp.broadcast_to(q, (1, 16, 2, 8)), angles)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1),
                             jnp.broadcast_to(jnp.linalg.norm(q, axis=-1), (1, 16, 2)), rtol=1e-5)
  # Hand-computed pair rotation at token 1 (x=1, y=0): angle = freqs[0].
  a = angles[1, 0, 0]
  expect = [q[0, 0, 0, 0] * jnp.cos(a) - q[0, 0, 0, 1] * jnp.sin(a),
            q[0, 0, 0, 0] * jnp.sin(a) + q[0, 0, 0, 1] * jnp.cos(a)]
  np.testing.assert_allclose(rotated[0, 1, 0, :2], expect, rtol=1e-5)
  cos_only = rope.apply_rope(q, angles[1:2], mode="cos_only")
  np.testing.assert_allclose(cos_only[0, 0, 0, :2], q[0, 0, 0, :2] * jnp.cos(a), rtol=1e-5)


class _Jitted:
  """Calls a model through one jit per `train` flag (eager op-by-op execution is slow)."""

  def __init__(self, model):
    self.graphdef, state = nnx.split(model)
    self.params = nnx.to_pure_dict(state)
    self.fns = {train: jax.jit(lambda p, i, m, v, k, train=train: nnx.merge(self.graphdef, p)(
        i, m, v, train=train, key=k)) for train in (False, True)}

  def __call__(self, image, meta, valid, train=False, key=None):
    return self.fns[train](self.params, image, meta, valid, key)


def _tiny(small_dataset, **model):
  c = tiny_config(small_dataset[0])
  for t, n in zip(c.data.task_keys_h5, (5, 4, 3, 2)):
    c.model.classification.heads[t].num_classes = n
  for k, v in model.items():
    c.model[k] = v
  return c, _Jitted(models.build(c, nnx.Rngs(0)))


def _inputs(b=2, key=0):
  ks = jax.random.split(jax.random.PRNGKey(key), 4)
  image = jax.random.uniform(ks[0], (b, 32, 32, 3))
  meta = {"TEMPORAL": jax.random.normal(ks[1], (b, 2)), "SPATIAL": jax.random.normal(ks[2], (b, 3)),
          "ELEVATION": jax.random.normal(ks[3], (b, 10))}
  return image, meta


def test_forward_contract(small_dataset):
  c, model = _tiny(small_dataset)
  image, meta = _inputs()
  out = model(image, meta, jnp.ones((2, 3), bool))
  assert list(out) == list(c.data.task_keys_h5)
  assert [v.shape for v in out.values()] == [(2, 5), (2, 4), (2, 3), (2, 2)]
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_invalid_metadata_uses_the_learned_token(small_dataset):
  _, model = _tiny(small_dataset)
  image, meta = _inputs()
  other = jax.tree.map(lambda x: x * 5 + 1, meta)
  invalid = jnp.array([[False, False, False], [True, True, True]])
  a, b = model(image, meta, invalid), model(image, other, invalid)
  np.testing.assert_allclose(a["taxa_L10"][0], b["taxa_L10"][0], atol=1e-6)  # ignores values
  assert not np.allclose(a["taxa_L10"][1], b["taxa_L10"][1])  # valid values matter


def test_zeros_mode_embeds_invalid_components_from_zeros(small_dataset):
  _, model = _tiny(small_dataset, meta_missing="zeros")
  image, meta = _inputs()
  zeros = jax.tree.map(jnp.zeros_like, meta)
  a = model(image, meta, jnp.zeros((2, 3), bool))
  b = model(image, zeros, jnp.ones((2, 3), bool))
  np.testing.assert_allclose(a["taxa_L20"], b["taxa_L20"], atol=1e-6)


@pytest.mark.slow
def test_drop_path_only_in_training(small_dataset):
  _, model = _tiny(small_dataset)
  image, meta = _inputs(b=8)
  valid = jnp.ones((8, 3), bool)
  e1, e2 = model(image, meta, valid), model(image, meta, valid)
  np.testing.assert_array_equal(e1["taxa_L10"], e2["taxa_L10"])
  t1 = model(image, meta, valid, train=True, key=jax.random.PRNGKey(1))
  t2 = model(image, meta, valid, train=True, key=jax.random.PRNGKey(2))
  assert not np.allclose(t1["taxa_L10"], t2["taxa_L10"])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits(small_dataset):
  _, model = _tiny(small_dataset, dtype="bfloat16")
  _, ref = _tiny(small_dataset)  # same seed: the same float32 weights
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.params))
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(a, b)
  image, meta = _inputs(b=4)
  out = model(image, meta, jnp.ones((4, 3), bool))
  want = ref(image, meta, jnp.ones((4, 3), bool))
  for t in out:
    assert out[t].dtype == jnp.float32 and np.isfinite(out[t]).all()
    scale = float(np.abs(want[t]).max())
    np.testing.assert_allclose(out[t], want[t], atol=0.05 * scale)  # bf16: ~3 significant digits
    assert not np.array_equal(out[t], want[t])  # really computed in bfloat16


def test_rope_gradients_equal_autodiff_of_the_rotation():
  """The custom backward of the rotation (batch sums as a product on CPU) against autodiff of the
  plain formula, for x and the angles, in both modes."""
  kx, ka, kg = jax.random.split(jax.random.PRNGKey(4), 3)
  x = jax.random.normal(kx, (3, 5, 2, 8))
  angles = jax.random.normal(ka, (5, 2, 4))
  g = jax.random.normal(kg, x.shape)

  def plain(x, a, mode):
    xe, xo, c, s = x[..., 0::2], x[..., 1::2], jnp.cos(a), jnp.sin(a)
    ye, yo = (xe * c - xo * s, xe * s + xo * c) if mode == "rotate" else (xe * c, xo * c)
    return jnp.stack([ye, yo], -1).reshape(x.shape)
  for mode in ("rotate", "cos_only"):
    grads = lambda f: jax.jit(jax.grad(lambda x, a: (f(x, a, mode) * g).sum(), argnums=(0, 1)))(
        x, angles)
    for got, want in zip(grads(rope.apply_rope), grads(plain)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
