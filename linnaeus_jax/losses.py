"""Per-sample, per-task losses on target distributions, with null masking and task weights.

L_t = sum_b m_tb * l_tb / max(sum_b m_tb, 1), total = sum_t w_t * L_t (reference/training.md §5.4),
where m excludes null samples (class 0 with partial labels) when Phase 1 masking is on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_target_ce(logits_BxC, targets_BxC):
  return -jnp.sum(targets_BxC * jax.nn.log_softmax(logits_BxC.astype(jnp.float32)), axis=-1)


def cross_entropy(logits_BxC, targets_BxC, smoothing):
  """Hard-label CE: a soft target is argmax-ed first, as the original's CrossEntropyLoss."""
  del smoothing
  hard = jax.nn.one_hot(jnp.argmax(targets_BxC, -1), logits_BxC.shape[-1])
  return soft_target_ce(logits_BxC, hard)


def label_smoothing_ce(logits_BxC, targets_BxC, smoothing):
  """1 - s on the target class, s / (C - 1) elsewhere (soft targets are smoothed likewise)."""
  c = logits_BxC.shape[-1]
  smoothed = targets_BxC * (1.0 - smoothing) + (1.0 - targets_BxC) * smoothing / max(c - 1, 1)
  return soft_target_ce(logits_BxC, smoothed)


LOSSES = {
    "CrossEntropyLoss": cross_entropy,
    "LabelSmoothingCrossEntropy": label_smoothing_ce,
    "SoftTargetCrossEntropy": lambda z, y, s: soft_target_ce(z, y),
}


def task_losses(logits: dict, labels: dict, task_keys, funcs, *, smoothing: float,
                partial_levels: bool, mask_nulls: bool, example_mask_B=None):
  """{task: (mean loss over included samples, per-sample loss (B,), include mask (B,))}."""
  out = {}
  for task, fn in zip(task_keys, funcs):
    z = logits[task]
    y = jax.nn.one_hot(labels[task], z.shape[-1])
    per_sample = LOSSES[fn](z, y, smoothing)
    include = jnp.ones(per_sample.shape, bool) if example_mask_B is None else example_mask_B
    if partial_levels and mask_nulls:
      include = include & (labels[task] != 0)
    m = include.astype(jnp.float32)
    out[task] = (jnp.sum(m * per_sample) / jnp.maximum(jnp.sum(m), 1.0), per_sample, include)
  return out


def total_loss(per_task: dict, task_keys, weights=None):
  weights = weights or [1.0] * len(task_keys)
  return sum(w * per_task[t][0] for w, t in zip(weights, task_keys))
