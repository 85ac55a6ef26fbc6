"""GradNorm: closed-form rule vs a numpy reference, per-task norms, masks and the lax.cond gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linnaeus_jax import gradnorm

EXCLUDE = ["head", "meta_"]


def ref_update(w, l0, initialized, losses, norms, alpha):
  """Reference for the closed-form GradNorm update (docs/training.md#losses, task weights),
  written from the text (plain numpy, float64)."""
  w, l0 = np.array(w, np.float64), np.array(l0, np.float64)
  losses, norms = np.asarray(losses, np.float64), np.asarray(norms, np.float64)
  n = len(w)
  if not initialized and alpha > 0:
    l0, initialized = losses.copy(), True
  g_bar = norms.mean()
  if alpha == 0:
    target = np.full(n, g_bar)
  else:
    r = losses / l0
    target = g_bar * (n * r / r.sum()) ** alpha
  for t in range(n):
    if target[t] >= 1e-8:
      w[t] = w[t] * norms[t] / target[t]
  return n * w / w.sum(), l0, initialized


def _check_sequence(alpha, init_weights, calls):
  state = gradnorm.init_state(3, init_weights)
  w, l0, init = np.array(init_weights or [1.0, 1.0, 1.0]), np.zeros(3), False
  upd = jax.jit(gradnorm.update, static_argnums=3)
  for losses, norms in calls:
    state = upd(state, jnp.array(losses), jnp.array(norms), alpha)
    w, l0, init = ref_update(w, l0, init, losses, norms, alpha)
    np.testing.assert_allclose(state["weights"], w, rtol=1e-5)
    np.testing.assert_allclose(state["initial_losses"], l0, rtol=1e-6)
    assert bool(state["initialized"]) == init
    np.testing.assert_allclose(float(jnp.sum(state["weights"])), 3.0, rtol=1e-6)
  return state


def test_init_state():
  s = gradnorm.init_state(3)
  np.testing.assert_array_equal(s["weights"], [1, 1, 1])
  np.testing.assert_array_equal(s["initial_losses"], [0, 0, 0])
  assert s["weights"].dtype == jnp.float32 and s["initialized"].dtype == jnp.bool_
  assert not bool(s["initialized"]) and s["initialized"].shape == ()
  np.testing.assert_array_equal(gradnorm.init_state(2, [0.5, 2.0])["weights"], [0.5, 2.0])
  np.testing.assert_array_equal(gradnorm.init_state(2, [])["weights"], [1, 1])
  with pytest.raises(ValueError):
    gradnorm.init_state(3, [1.0, 2.0])


def test_update_matches_reference_alpha_1_5():
  calls = [([2.0, 1.0, 4.0], [0.5, 1.0, 2.0]),   # first: records L(0), r = 1
           ([1.5, 0.9, 2.0], [0.7, 0.2, 1.1]),
           ([1.0, 0.8, 1.2], [0.3, 0.4, 0.9]),
           ([0.6, 0.7, 1.0], [1.0, 0.1, 0.5])]
  state = _check_sequence(1.5, [1.0, 2.0, 0.5], calls)
  np.testing.assert_allclose(state["initial_losses"], [2.0, 1.0, 4.0])  # not overwritten later
  # The first call alone: target = mean norm, w_t *= G_t / Gbar, renormalised.
  s1 = gradnorm.update(gradnorm.init_state(3), jnp.array([2.0, 1.0, 4.0]),
                       jnp.array([0.5, 1.0, 2.0]), 1.5)
  g = np.array([0.5, 1.0, 2.0])
  np.testing.assert_allclose(s1["weights"], 3 * g / g.sum(), rtol=1e-6)


def test_update_alpha_zero_balances_norms_and_skips_l0():
  calls = [([2.0, 1.0, 4.0], [0.5, 1.0, 2.0]), ([0.1, 5.0, 3.0], [2.0, 1.0, 4.0])]
  state = _check_sequence(0.0, None, calls)
  assert not bool(state["initialized"])  # L(0) only recorded for alpha > 0
  np.testing.assert_array_equal(state["initial_losses"], [0, 0, 0])


def test_update_skips_tiny_targets():
  # Third task's loss collapses: r~^1.5 ~ 1e-18, target < 1e-8, so its weight is only
  # renormalised (without the skip it would be multiplied by ~1e18).
  calls = [([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
           ([1.0, 2.0, 1e-12], [0.5, 2.0, 3.0])]
  s2 = _check_sequence(1.5, None, calls)
  assert float(s2["weights"][2]) < 3.0 and np.all(np.isfinite(s2["weights"]))
  # Every target below 1e-8 (all norms 0): weights unchanged.
  s3 = gradnorm.update(s2, jnp.array([0.5, 0.5, 0.5]), jnp.zeros(3), 1.5)
  np.testing.assert_allclose(s3["weights"], s2["weights"], rtol=1e-6)
  # All losses 0 (sum r = 0, the reference's 0/0): r~ = 1, so target = mean norm as alpha = 0.
  g = np.array([1.0, 2.0, 3.0])
  s4 = gradnorm.update(s2, jnp.zeros(3), jnp.asarray(g), 1.5)
  w = np.asarray(s2["weights"]) * g / g.mean()
  np.testing.assert_allclose(s4["weights"], 3 * w / w.sum(), rtol=1e-5)


def test_update_guards():
  s = gradnorm.update(gradnorm.init_state(2), jnp.array([0.0, 1.0]), jnp.ones(2), 1.5)
  # L(0) = 0 gives ratio 1 instead of inf/nan, and is re-recorded on the next update.
  s = gradnorm.update(s, jnp.array([0.7, 0.5]), jnp.array([1.0, 3.0]), 1.5)
  assert np.all(np.isfinite(s["weights"]))
  np.testing.assert_allclose(s["initial_losses"], [0.7, 1.0])
  before = s
  s = gradnorm.update(s, jnp.array([jnp.nan, 1.0]), jnp.ones(2), 1.5)
  for k in s:
    np.testing.assert_array_equal(s[k], before[k])


def _tiny():
  """Shared W (3, 4), excluded head biases and a meta_ scale; L_t = 0.5 ||W x + v_t - y_t||^2."""
  rng = np.random.default_rng(0)
  params = {"trunk": {"W": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
            "head": {"v0": jnp.asarray(rng.normal(size=3), jnp.float32),
                     "v1": jnp.asarray(rng.normal(size=3), jnp.float32)},
            "meta_1": {"u": jnp.asarray(0.7, jnp.float32)}}
  x = jnp.asarray(rng.normal(size=4), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)

  def losses_fn(p):
    h = p["trunk"]["W"] @ x
    e0 = h + p["head"]["v0"] - y[0]
    e1 = h + p["head"]["v1"] - y[1]
    meta = 0.5 * p["meta_1"]["u"] ** 2
    return jnp.stack([0.5 * e0 @ e0 + meta, 0.5 * e1 @ e1 + 3 * meta])
  return params, x, y, losses_fn


def test_task_grad_norms_closed_form():
  params, x, y, losses_fn = _tiny()
  mask = gradnorm.shared_mask(params, EXCLUDE)
  losses, norms = jax.jit(lambda p: gradnorm.task_grad_norms(losses_fn, p, mask))(params)
  p = jax.tree.map(np.asarray, params)
  h = p["trunk"]["W"] @ np.asarray(x)
  e = [h + p["head"]["v0"] - y[0], h + p["head"]["v1"] - y[1]]
  meta = 0.5 * 0.7 ** 2
  np.testing.assert_allclose(losses, [0.5 * e[0] @ e[0] + meta, 0.5 * e[1] @ e[1] + 3 * meta],
                             rtol=1e-5)
  # dL_t/dW = e_t x^T, so ||.|| = ||e_t|| ||x||; head (||e_t||) and meta_ (u) left out.
  expected = [np.linalg.norm(et) * np.linalg.norm(x) for et in e]
  np.testing.assert_allclose(norms, expected, rtol=1e-5)
  everything = jax.tree.map(lambda _: True, params)
  _, all_norms = gradnorm.task_grad_norms(losses_fn, params, everything)
  assert np.all(np.asarray(all_norms) > np.asarray(norms) * (1 + 1e-3))
  assert losses.dtype == jnp.float32 and norms.dtype == jnp.float32


def test_task_grad_norms_does_not_differentiate_unshared():
  params, _, _, losses_fn = _tiny()

  @jax.custom_vjp
  def guarded(v):
    return v

  def fwd(v):
    raise AssertionError("an excluded parameter was differentiated")

  guarded.defvjp(fwd, lambda res, g: (g,))
  guarded_fn = lambda p: losses_fn({**p, "head": jax.tree.map(guarded, p["head"])})
  mask = gradnorm.shared_mask(params, EXCLUDE)
  _, norms = gradnorm.task_grad_norms(guarded_fn, params, mask)
  assert np.all(np.isfinite(norms))
  with pytest.raises(AssertionError):
    gradnorm.task_grad_norms(guarded_fn, params, jax.tree.map(lambda _: True, params))


def test_shared_mask_paths():
  z = jnp.zeros(2)
  params = {"stem": {"conv": {"kernel": z}},
            "stage3": {"blocks": [{"attn": {"qkv": {"kernel": z}}}, {"mlp": {"fc1": {"bias": z}}}]},
            "head": {"taxa_L10": {"fc": {"kernel": z}}},
            "meta_1": {"proj": {"kernel": z}},
            "meta": {"scale": z},
            "norm": {"head_scale": z}}
  mask = gradnorm.shared_mask(params, EXCLUDE)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert mask == {"stem": {"conv": {"kernel": True}},
                  "stage3": {"blocks": [{"attn": {"qkv": {"kernel": True}}},
                                        {"mlp": {"fc1": {"bias": True}}}]},
                  "head": {"taxa_L10": {"fc": {"kernel": False}}},
                  "meta_1": {"proj": {"kernel": False}},
                  "meta": {"scale": True},          # "meta" lacks the "meta_" substring
                  "norm": {"head_scale": False}}    # substring anywhere in the path
  assert all(type(b) is bool for b in jax.tree.leaves(mask))
  assert all(jax.tree.leaves(gradnorm.shared_mask(params, [])))


def test_should_update():
  steps = jnp.arange(20)
  fired = np.asarray(gradnorm.should_update(steps, 4, 6))
  np.testing.assert_array_equal(np.nonzero(fired)[0], [8, 12, 16])
  np.testing.assert_array_equal(np.nonzero(gradnorm.should_update(steps, 4, 8))[0], [8, 12, 16])
  np.testing.assert_array_equal(np.nonzero(gradnorm.should_update(steps, 5, 0))[0],
                                [0, 5, 10, 15])
  assert not bool(gradnorm.should_update(0, 0, 0))


def test_maybe_update_under_jit():
  params, _, _, losses_fn = _tiny()
  mask = gradnorm.shared_mask(params, EXCLUDE)

  @jax.jit
  def step_fn(state, step, params):
    return gradnorm.maybe_update(state, step, losses_fn, params, mask, alpha=1.5,
                                 update_interval=4, warmup_steps=6)

  state = gradnorm.init_state(2, [1.5, 0.5])
  for step in (0, 4, 5, 7):  # below warmup, or not a multiple of 4
    new, info = step_fn(state, jnp.int32(step), params)
    for k in state:
      np.testing.assert_array_equal(new[k], state[k])
    assert not bool(info["updated"])
    for k in ("norm", "target", "ratio", "loss"):
      np.testing.assert_array_equal(info[k], np.zeros(2))

  new, info = step_fn(state, jnp.int32(8), params)
  losses, norms = gradnorm.task_grad_norms(losses_fn, params, mask)
  expected = gradnorm.update(state, losses, norms, 1.5)
  assert bool(info["updated"]) and bool(new["initialized"])
  np.testing.assert_allclose(new["weights"], expected["weights"], rtol=1e-5)
  np.testing.assert_allclose(new["initial_losses"], losses, rtol=1e-6)
  np.testing.assert_allclose(info["norm"], norms, rtol=1e-6)
  np.testing.assert_allclose(info["loss"], losses, rtol=1e-6)
  np.testing.assert_allclose(info["ratio"], [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(info["target"], [np.mean(norms)] * 2, rtol=1e-5)
  assert not np.allclose(new["weights"], state["weights"])
