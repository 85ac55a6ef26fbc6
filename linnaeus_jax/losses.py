"""Per-sample, per-task losses on (mixed) target distributions, with null masking and weights.

Per task (docs/training.md#losses): the criterion's target row for a hard label (one-hot,
smoothed one-hot or a taxonomy-smoothing row), mixed with the batch's lambda; the per-sample loss
l_b = -sum_c y_bc log softmax(z_b)_c; the include mask m_b (padding, nulls, null-keep coin); the
class weight w_b = sum_c h_bc w_c applied once (h = the mixed one-hot);
L_t = sum_b m_b w_b l_b / max(sum_b m_b, 1) and total = sum_t task_w_t L_t.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- Class weights


def _absent_is_one(n_C, w_C):
  return np.where(n_C > 0, w_C, 1.0)


def _w_none(n_C, total, **_):
  return np.ones_like(n_C)


def _w_smoothing(n_C, total, *, smoothing_factor, **_):
  den_C = n_C + smoothing_factor
  return np.where(den_C > 0, total / np.where(den_C > 0, den_C, 1.0), 1.0)


def _w_capping(n_C, total, *, cap, **_):
  return _absent_is_one(n_C, np.minimum(total / np.maximum(n_C, 1.0), cap))


def _w_exponential(n_C, total, *, base, **_):
  with np.errstate(over="ignore"):
    return _absent_is_one(n_C, np.power(base, total / np.maximum(n_C, 1.0)))


def _w_logarithmic(n_C, total, *, log_base, **_):
  if log_base <= 0 or log_base == 1:
    raise ValueError(f"class weights: log_base must be > 0 and != 1, got {log_base}")
  r_C = n_C / total
  return 1.0 / (1.0 + np.log(r_C * (log_base - 1.0) + 1.0) / np.log(log_base))


CLASS_WEIGHTS = {
    "none": _w_none,
    "smoothing": _w_smoothing,
    "capping": _w_capping,
    "exponential": _w_exponential,
    "logarithmic": _w_logarithmic,
}


def class_weights(counts_C: np.ndarray, method: str, *, smoothing_factor: float = 0.1,
                  cap: float = 20.0, base: float = 2.0, log_base: float = 10.0) -> np.ndarray:
  """Per-class loss weights (C,) float32 from train counts n_c (docs/training.md#losses; N = sum n_c, class 0 in).

  none 1; smoothing N / (n_c + smoothing_factor); capping min(N / n_c, cap);
  exponential base^(N / n_c); logarithmic 1 / (1 + log_b(r (b - 1) + 1)), r = n_c / N.
  Division guards: a class with n_c = 0 gets 1 where its formula would divide by zero (capping,
  exponential, smoothing with factor 0); with no counts at all (N = 0) every weight is 1. A weight
  that overflows float32 (exponential with a large N / n_c) is a ValueError, not a silent inf.
  """
  if method not in CLASS_WEIGHTS:
    raise ValueError(f"class weight method {method!r} not in {sorted(CLASS_WEIGHTS)}")
  n_C = np.asarray(counts_C, np.float64)
  if n_C.ndim != 1 or (n_C < 0).any():
    raise ValueError("class counts must be a 1-D array of non-negative counts")
  total = float(n_C.sum())
  if total == 0:
    return np.ones(n_C.shape, np.float32)
  w_C = CLASS_WEIGHTS[method](n_C, total, smoothing_factor=smoothing_factor, cap=cap, base=base,
                              log_base=log_base)
  bad_C = ~(np.abs(w_C) <= np.finfo(np.float32).max)
  if bad_C.any():
    raise ValueError(f"class weights ({method}) are not finite in float32 for classes "
                     f"{np.flatnonzero(bad_C)[:10].tolist()}; use another method")
  return w_C.astype(np.float32)


# ----------------------------------------------------------------------------- Criteria


@dataclasses.dataclass(frozen=True)
class Criterion:
  """`rows(y_B, C, smoothing, matrix_CxC)`: the (B, C) target rows for hard labels.

  `argmax`: the original argmax-ed mixed targets first (used with `argmax_targets`).
  """
  rows: Callable
  argmax: bool


def _one_hot_rows(y_B, c, smoothing, matrix):
  return jax.nn.one_hot(y_B, c, dtype=jnp.float32)


def _smoothed_rows(y_B, c, smoothing, matrix):
  oh_BxC = jax.nn.one_hot(y_B, c, dtype=jnp.float32)
  return oh_BxC * (1.0 - smoothing) + (1.0 - oh_BxC) * (smoothing / max(c - 1, 1))


def _taxonomy_rows(y_B, c, smoothing, matrix):
  return jnp.take(jnp.asarray(matrix, jnp.float32), y_B, axis=0, mode="clip")


CRITERIA = {
    "CrossEntropyLoss": Criterion(_one_hot_rows, argmax=True),
    "LabelSmoothingCrossEntropy": Criterion(_smoothed_rows, argmax=True),
    "SoftTargetCrossEntropy": Criterion(_one_hot_rows, argmax=False),
    "TaxonomyAwareLabelSmoothing": Criterion(_taxonomy_rows, argmax=True),
}


def soft_target_ce(logits_BxC, targets_BxC):
  """-sum_c y_c log softmax(z)_c in float32, per sample (B,)."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32))
  return -jnp.sum(targets_BxC.astype(jnp.float32) * logp_BxC, axis=-1)


def _mix(a_BxC, lam_B, partner_B):
  if lam_B is None:
    return a_BxC
  lam_Bx1 = jnp.asarray(lam_B, jnp.float32)[:, None]
  return lam_Bx1 * a_BxC + (1.0 - lam_Bx1) * a_BxC[partner_B]


# ----------------------------------------------------------------------------- Task losses


class TaskLoss(NamedTuple):
  """One task's loss on a batch: `mean` = sum_b weight_b loss_b / max(sum_b include_b, 1)."""
  mean: jax.Array
  per_sample_B: jax.Array  # unweighted, every row (padding and nulls included)
  include_B: jax.Array  # bool: counted in the mean (not padding, not a masked null)
  weight_B: jax.Array  # include_b times the sample's class weight



def task_losses(logits: dict, labels: dict, task_keys, funcs, *, smoothing: float,
                null_class: bool, mask_nulls: bool, example_mask_B=None, lam_B=None,
                partner_B=None, tax_matrices: dict | None = None,
                class_weights: dict | None = None, null_keep_prob=None, key=None,
                argmax_targets: bool = False):
  """{task: `TaskLoss`}: the mean loss L_t and its per-sample parts.

  Args:
    logits, labels: {task: (B, C) logits}, {task: (B,) int class}.
    task_keys, funcs: the tasks and their criterion names (keys of `CRITERIA`).
    smoothing: LabelSmoothingCrossEntropy's s.
    null_class: class 0 is the null label; without it no sample is null.
    mask_nulls: Phase 1: null samples are excluded (takes precedence over `null_keep_prob`).
    example_mask_B: False for padding rows, always excluded.
    lam_B, partner_B: mixing (both or neither): target = lam row(y_b) + (1 - lam) row(y_partner);
      lam_B = 1 for unmixed samples. A sample is null iff its mixed one-hot h has h_0 > 0.5.
    tax_matrices: {task: (C, C) T} for TaxonomyAwareLabelSmoothing (pass jnp arrays under jit).
    class_weights: {task: (C,) w}; a task's samples are weighted by sum_c h_c w_c.
    null_keep_prob, key: scheduled null masking: each null sample is kept with an independent
      Bernoulli(null_keep_prob) coin per task (key folded with the task's index).
    argmax_targets: the original's behaviour: criteria that argmax-ed (all but
      SoftTargetCrossEntropy) build their row from argmax(h) instead of mixing rows.
  """
  if (lam_B is None) != (partner_B is None):
    raise ValueError("task_losses: give both lam_B and partner_B, or neither")
  out = {}
  for i, (task, fn) in enumerate(zip(task_keys, funcs)):
    if fn not in CRITERIA:
      raise ValueError(f"loss for {task}: {fn!r} not in {sorted(CRITERIA)}")
    crit = CRITERIA[fn]
    matrix = None
    if fn == "TaxonomyAwareLabelSmoothing":
      if not tax_matrices or task not in tax_matrices:
        raise ValueError(f"TaxonomyAwareLabelSmoothing for {task} needs its smoothing matrix "
                         "(enable loss.taxonomy_smoothing for this task)")
      matrix = tax_matrices[task]
    z_BxC, y_B = logits[task], labels[task]
    c = z_BxC.shape[-1]
    h_BxC = _mix(jax.nn.one_hot(y_B, c, dtype=jnp.float32), lam_B, partner_B)
    if argmax_targets and crit.argmax:
      target_BxC = crit.rows(jnp.argmax(h_BxC, axis=-1), c, smoothing, matrix)
    else:
      target_BxC = _mix(crit.rows(y_B, c, smoothing, matrix), lam_B, partner_B)
    per_sample_B = soft_target_ce(z_BxC, target_BxC)

    include_B = (jnp.ones(y_B.shape, bool) if example_mask_B is None
                 else jnp.asarray(example_mask_B).astype(bool))
    if null_class:
      null_B = h_BxC[:, 0] > 0.5
      if mask_nulls:
        include_B = include_B & ~null_B
      elif null_keep_prob is not None:
        if key is None:
          raise ValueError("task_losses: null_keep_prob needs a key")
        coin_B = jax.random.bernoulli(jax.random.fold_in(key, i), null_keep_prob, y_B.shape)
        include_B = include_B & (~null_B | coin_B)
    m_B = include_B.astype(jnp.float32)
    if class_weights is not None and task in class_weights:
      w_C = jnp.asarray(class_weights[task], jnp.float32)
      m_w_B = m_B * jnp.sum(h_BxC * w_C[None, :], axis=-1)
    else:
      m_w_B = m_B
    mean = jnp.sum(m_w_B * per_sample_B) / jnp.maximum(jnp.sum(m_B), 1.0)
    out[task] = TaskLoss(mean, per_sample_B, include_B, m_w_B)
  return out


def total_loss(per_task: dict, task_keys, weights=None):
  """sum_t w_t L_t; `weights` a list or a (T,) array (e.g. GradNorm's), None or [] -> ones."""
  if weights is None or (isinstance(weights, (list, tuple)) and not weights):
    return sum(per_task[t][0] for t in task_keys)
  return sum(weights[i] * per_task[t][0] for i, t in enumerate(task_keys))
