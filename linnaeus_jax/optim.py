"""Optax optimizer and learning-rate schedule (warmup then decay measured from the warmup end)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from linnaeus_jax import config as config_lib


def lr_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup warmup_lr -> base_lr over W steps, then cosine/linear/constant to min_lr."""
  s = config.lr_scheduler
  warmup = config_lib.resolve_steps(s.warmup_steps, s.warmup_fraction, s.warmup_epochs,
                                    total_steps, steps_per_epoch)
  warmup = min(warmup, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if s.name == "cosine":
    decay = optax.cosine_decay_schedule(s.base_lr, decay_steps, alpha=s.min_lr / s.base_lr)
  elif s.name == "linear":
    decay = optax.linear_schedule(s.base_lr, s.min_lr, decay_steps)
  else:
    decay = optax.constant_schedule(s.base_lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(s.warmup_lr, s.base_lr, warmup), decay],
                              [warmup])


def decay_mask(params):
  """Weight decay only on matrices and conv kernels (not biases, norms, tokens, RoPE freqs)."""
  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim >= 2 and "freqs" not in name and "token" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def build(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  parts = []
  if config.train.clip_grad > 0:
    parts.append(optax.clip_by_global_norm(config.train.clip_grad))
  parts.append(optax.adamw(schedule, b1=o.betas[0], b2=o.betas[1], eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def global_norm(tree):
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
