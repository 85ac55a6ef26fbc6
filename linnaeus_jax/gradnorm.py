"""GradNorm task weighting: the original's closed-form multiplicative rule (docs/training.md#losses).

Not the paper's gradient descent on L_grad. Every `update_interval` steps (from `warmup_steps`,
step 0 included), with G_t = ||dL_t / d theta_shared||_2 and L_t(0) the losses of the first
update:

  G = mean_t G_t,  r_t = L_t / L_t(0),  r~_t = T r_t / sum r,  target_t = G r~_t^alpha,
  w_t <- w_t G_t / target_t (skipped where target_t < 1e-8),  w <- T w / sum w.

The state ({weights, initial_losses, initialized}) is a dict of arrays so that it lives in the
train state and is checkpointed with it (the original lost it on resume). Everything is
jit-traceable; `maybe_update` runs the per-task gradients under `lax.cond` so they cost nothing
on other steps.

Devices: under `jax.jit` with sharded global inputs, the losses (and hence G_t) are already
means over the global batch, so no explicit `pmean` is needed (the original's per-rank drift is
gone by construction).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

MIN_TARGET = 1e-8  # tasks whose target is below this keep their weight (original's guard)


def init_state(num_tasks: int, init_weights: Sequence[float] | None = None) -> dict:
  """Initial GradNorm state: weights = `init_weights` (or ones), L(0) not yet recorded."""
  if init_weights is not None and len(init_weights):
    if len(init_weights) != num_tasks:
      raise ValueError(f"init_weights has {len(init_weights)} entries for {num_tasks} tasks")
    weights = jnp.asarray(init_weights, jnp.float32)
  else:
    weights = jnp.ones((num_tasks,), jnp.float32)
  return {"weights": weights, "initial_losses": jnp.zeros((num_tasks,), jnp.float32),
          "initialized": jnp.zeros((), bool)}


def path_str(path) -> str:
  """'/'-joined key path, e.g. 'stage3/blocks/0/attn/qkv/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def shared_mask(params, exclude: Sequence[str]):
  """Pytree of Python bools like `params`: True where the path contains no `exclude` substring."""
  exclude = tuple(exclude)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not any(e in path_str(p) for e in exclude), params)


def should_update(step, update_interval: int, warmup_steps: int = 0):
  """Traced bool: step >= warmup_steps and step % update_interval == 0 (step 0 fires).

  `step` is the optimizer step about to be taken (the train state's step before increment).
  An `update_interval` <= 0 never fires.
  """
  step = jnp.asarray(step)
  if update_interval <= 0:
    return jnp.zeros((), bool)
  return (step >= warmup_steps) & (step % update_interval == 0)


def task_grad_norms(losses_fn: Callable, params, mask):
  """(losses (T,), norms (T,)): norms[t] = ||d losses[t] / d shared params||_2, in float32.

  Only the shared leaves (`mask` True) are differentiated; the others enter as constants. One
  forward (linearisation) is shared by the T backward passes, which run one at a time under
  `lax.map` so that only one task's gradient is live at once (memory ~ one ordinary step).

  Args:
    losses_fn: params -> (T,) per-task mean losses.
    params: the parameter pytree.
    mask: `shared_mask(params, ...)`.
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(mask)
  shared = [x for x, f in zip(leaves, flags) if f]

  def losses_of_shared(shared_leaves):
    it = iter(shared_leaves)
    full = [next(it) if f else x for x, f in zip(leaves, flags)]
    return losses_fn(jax.tree.unflatten(treedef, full))

  losses_T, vjp_fn = jax.vjp(losses_of_shared, shared)
  num_tasks = losses_T.shape[0]

  def norm_of(cotangent_T):
    (grads,) = vjp_fn(cotangent_T)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads))

  if not shared:
    norms_T = jnp.zeros((num_tasks,), jnp.float32)
  else:
    norms_T = jax.lax.map(norm_of, jnp.eye(num_tasks, dtype=losses_T.dtype))
  return losses_T.astype(jnp.float32), norms_T.astype(jnp.float32)


def _update(state: dict, losses_T, norms_T, alpha: float):
  """The update rule of the module docstring; returns (new state, info)."""
  w = state["weights"]
  num_tasks = w.shape[0]
  losses_T = jnp.asarray(losses_T, jnp.float32)
  norms_T = jnp.asarray(norms_T, jnp.float32)
  alpha = jnp.asarray(alpha, jnp.float32)
  # L(0) is recorded on the first update (alpha > 0 only, as the original). A task whose L(0)
  # is not positive (e.g. no included samples in that batch) takes its next loss instead, and
  # meanwhile its ratio is 1 (neutral) instead of inf / nan.
  record = (alpha > 0) & (~state["initialized"] | (state["initial_losses"] <= 0))
  l0 = jnp.where(record, losses_T, state["initial_losses"])
  initialized = state["initialized"] | (alpha > 0)
  g_bar = jnp.mean(norms_T)
  ratio = jnp.where(l0 > 0, losses_T / jnp.where(l0 > 0, l0, 1.0), 1.0)
  r_sum = jnp.sum(ratio)
  rel = jnp.where(r_sum > 0, num_tasks * ratio / jnp.where(r_sum > 0, r_sum, 1.0), 1.0)
  target = jnp.where(alpha == 0, g_bar, g_bar * jnp.power(rel, alpha))
  ok = target >= MIN_TARGET
  new_w = jnp.where(ok, w * norms_T / jnp.where(ok, target, 1.0), w)
  w_sum = jnp.sum(new_w)
  new_w = num_tasks * new_w / jnp.where(w_sum > 0, w_sum, 1.0)
  # A non-finite loss or norm (or an all-zero result) would poison the weights for good: skip.
  good = (jnp.all(jnp.isfinite(losses_T)) & jnp.all(jnp.isfinite(norms_T)) & (w_sum > 0)
          & jnp.all(jnp.isfinite(new_w)))
  new_state = {"weights": jnp.where(good, new_w, w),
               "initial_losses": jnp.where(good, l0, state["initial_losses"]),
               "initialized": jnp.where(good, initialized, state["initialized"])}
  info = {"norm": norms_T, "target": target, "ratio": ratio, "loss": losses_T,
          "updated": good}
  return new_state, info


def update(state: dict, losses_T, norms_T, alpha: float) -> dict:
  """New state after one closed-form GradNorm update (the rule in the module docstring).

  The first update with alpha > 0 records L(0) = losses_T (so r = 1 and target = mean norm).
  Weights are renormalised to sum to T. Guards: L(0) <= 0 gives ratio 1 (and is re-recorded at
  the next update); all ratios 0 gives r~ = 1 (target = mean norm); target < 1e-8 keeps that
  task's weight; non-finite inputs leave the state unchanged. A task with G_t = 0 gets weight 0
  (as in the original; the rule is multiplicative, so it stays 0).
  """
  return _update(state, losses_T, norms_T, alpha)[0]


def maybe_update(state: dict, step, losses_fn: Callable, params, mask, *, alpha: float,
                 update_interval: int, warmup_steps: int = 0):
  """(state, info): on update steps, per-task norms and `update`; otherwise state unchanged.

  The per-task gradients run inside `lax.cond`, so they are only computed on update steps.
  info: (T,) float32 "norm", "target", "ratio" (L / L(0)), "loss" (zeros on other steps) and
  scalar bool "updated".
  """
  num_tasks = state["weights"].shape[0]

  def do(state):
    losses_T, norms_T = task_grad_norms(losses_fn, params, mask)
    return _update(state, losses_T, norms_T, alpha)

  def skip(state):
    z = jnp.zeros((num_tasks,), jnp.float32)
    return state, {"norm": z, "target": z, "ratio": z, "loss": z,
                   "updated": jnp.zeros((), bool)}

  return jax.lax.cond(should_update(step, update_interval, warmup_steps), do, skip, state)
