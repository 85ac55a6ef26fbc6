"""Evaluation metrics as counts computed inside jit and summed on the host.

`batch_counts` returns sums (float32 scalars) over the real examples of a batch (`example_mask`);
sums add up across batches (`accumulate`) and, under jit with a sharded batch, across devices
(XLA inserts the all-reduce). `finalize` turns the summed counts into values: accuracies in
percent, as in the original; losses, mistake severity and hierarchical distances as means.
Every metric and its definition is listed in docs/evaluation.md.

Count keys (`t` a task, `t0 = task_keys[0]` the finest task, `k` in `topk`):
  n                          real examples
  correct1/t, correct{k}/t   top-1 / top-k correct (top-k = top-1 when the task has < k classes)
  loss_sum/t, loss_n/t       the training loss's numerator and denominator: per-sample loss
                             times its weight (`TaskLoss.weight_B`: class weight, 0 for
                             excluded nulls) summed, and the included samples counted
  loss_all_sum/t             per-sample loss of every real example (nulls included, unweighted)
  chain_correct              every task's top-1 correct (nulls included)
  partial_chain_n            samples with at least one non-null rank (all samples without
                             partial levels)
  partial_chain_correct      ... of which every non-null rank's top-1 is correct
  null_n/t, null_correct1/t, null_loss_sum/t              samples with label 0 (partial levels)
  non_null_n/t, non_null_correct1/t, non_null_loss_sum/t  samples with label != 0
  hdist_n/t0                 samples with a non-null finest label (with `lca_CxC`)
  hdist{k}_sum/t0            ... sum of the mean LCA height to the top-k predictions
  mistake_n/t0               ... of which the top-1 prediction is wrong
  mistake_height_sum/t0      ... sum of the LCA height between truth and top-1 prediction
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TOPK = (1, 3)


def effective_k(k: int, num_classes: int) -> int:
  """Top-k is top-1 when the task has fewer than k classes (the original's acc3 rule)."""
  return k if num_classes >= k else 1


def lca_heights(tree, task: str, null_class: bool = False, *, block: int = 1024) -> np.ndarray:
  """(C, C) height of the lowest common ancestor of every pair of `task`'s classes.

  0 on the diagonal (the class itself); h >= 1 when the two classes first share an ancestor h
  ranks up (1 = same parent, 2 = same grandparent, ...); R (the number of ranks from `task` to
  the top, `tree.ancestors(task).shape[0]`) when they share none: different top-rank classes, or
  an unknown link (-1) on the way up. With `null_class`, class 0 of any rank is unknown (it is
  nobody's ancestor), so the null class is at height R from every other class.

  The smallest signed integer dtype that holds R is used: int8 up to R = 127 ranks, else int16,
  so C = 684 classes take 468 KB and C = 10,000 take 100 MB (host and device). Built vectorised in
  row blocks of `block`, so that temporaries stay O(block * C).
  """
  anc_RxC = tree.ancestors(task, null_class=null_class)
  r, c = anc_RxC.shape
  dtype = np.int8 if r <= np.iinfo(np.int8).max else np.int16
  out_CxC = np.empty((c, c), dtype)
  for start in range(0, c, block):
    rows_N = np.arange(start, min(start + block, c))
    h_NxC = np.full((len(rows_N), c), r, dtype)
    # Coarsest first, so that the lowest common ancestor (smallest k) is written last.
    for k in range(r - 1, 0, -1):
      a_N = anc_RxC[k, rows_N]
      same_NxC = (a_N[:, None] == anc_RxC[k][None, :]) & (a_N >= 0)[:, None]
      h_NxC[same_NxC] = k
    h_NxC[np.arange(len(rows_N)), rows_N] = 0
    out_CxC[rows_N] = h_NxC
  return out_CxC


def _masked_sum(mask_B, x_B):
  """Sum of `x_B` over the real examples (`mask_B`), as a float32 scalar."""
  return jnp.sum(jnp.where(mask_B, x_B.astype(jnp.float32), 0.0))


def _top_indices(z_BxC, topk):
  """(B, K) class indices of the K largest logits, K the largest effective k of `topk`; None
  when K is 1 (top-1 is the argmax)."""
  kmax = max(effective_k(k, z_BxC.shape[-1]) for k in topk + (1,))
  # lax.top_k puts the lower index first among ties, like argmax.
  return jax.lax.top_k(z_BxC, kmax)[1] if kmax > 1 else None


def _task_counts(t: str, z_BxC, y_B, loss, top_idx_BxK, topk, null_class: bool, mask_B):
  """({count key: sum} of task `t`: correct1 / correct{k}, the loss sums and, with
  `null_class`, the null / non-null split), and its (B,) top-1 correct."""
  total = functools.partial(_masked_sum, mask_B)
  c = z_BxC.shape[-1]
  correct_B = jnp.argmax(z_BxC, -1) == y_B
  counts = {f"correct1/{t}": total(correct_B)}
  for k in topk:
    ke = effective_k(k, c)
    if k == 1:
      continue
    counts[f"correct{k}/{t}"] = total(
        correct_B if ke == 1 else jnp.any(top_idx_BxK[:, :ke] == y_B[:, None], -1))
  loss_B = loss.per_sample_B
  counts[f"loss_sum/{t}"] = total(loss.weight_B * loss_B)
  counts[f"loss_n/{t}"] = total(loss.include_B)
  counts[f"loss_all_sum/{t}"] = total(loss_B)
  if null_class:
    null_B = y_B == 0
    for name, sel_B in (("null", null_B), ("non_null", ~null_B)):
      counts[f"{name}_n/{t}"] = total(sel_B)
      counts[f"{name}_correct1/{t}"] = total(sel_B & correct_B)
      counts[f"{name}_loss_sum/{t}"] = total(jnp.where(sel_B, loss_B, 0.0))
  return counts, correct_B


def _chain_counts(correct: dict, labels: dict, task_keys, mask_B, n, null_class: bool) -> dict:
  """`chain_correct` (every task's top-1 correct) and the partial chain: with `null_class`,
  samples with a non-null rank and of those the ones correct at every non-null rank; without,
  the chain itself over all `n` samples."""
  total = functools.partial(_masked_sum, mask_B)
  all_correct_B = jnp.ones_like(mask_B)
  for t in task_keys:
    all_correct_B &= correct[t]
  out = {"chain_correct": total(all_correct_B)}
  if not null_class:
    return out | {"partial_chain_n": n, "partial_chain_correct": out["chain_correct"]}
  partial_ok_B = jnp.ones_like(mask_B)
  any_non_null_B = jnp.zeros_like(mask_B)
  for t in task_keys:
    null_B = labels[t] == 0
    partial_ok_B &= correct[t] | null_B
    any_non_null_B |= ~null_B
  out["partial_chain_n"] = total(any_non_null_B)
  out["partial_chain_correct"] = total(any_non_null_B & partial_ok_B)
  return out


def _hierarchy_counts(t0: str, z_BxC, y_B, lca_CxC, top_idx_BxK, topk, null_class: bool,
                      mask_B) -> dict:
  """Mistake severity and hierarchical distance@k counts of the finest task `t0`, from the LCA
  heights `lca_CxC`, over the samples with a known label (with `null_class`: not 0)."""
  total = functools.partial(_masked_sum, mask_B)
  c = z_BxC.shape[-1]
  if lca_CxC.shape != (c, c):
    raise ValueError(f"metrics: lca_CxC has shape {lca_CxC.shape}, task {t0} has {c} classes")
  valid_B = (y_B != 0) if null_class else jnp.ones_like(mask_B)
  pred_B = jnp.argmax(z_BxC, -1)
  h1_B = lca_CxC[y_B, pred_B].astype(jnp.float32)
  mistake_B = valid_B & (pred_B != y_B)
  counts = {f"hdist_n/{t0}": total(valid_B), f"mistake_n/{t0}": total(mistake_B),
            f"mistake_height_sum/{t0}": total(jnp.where(mistake_B, h1_B, 0.0))}
  for k in topk:
    ke = effective_k(k, c)
    if ke == 1:
      hk_B = h1_B
    else:
      hk_B = jnp.mean(lca_CxC[y_B[:, None], top_idx_BxK[:, :ke]].astype(jnp.float32), -1)
    counts[f"hdist{k}_sum/{t0}"] = total(jnp.where(valid_B, hk_B, 0.0))
  return counts


def batch_counts(logits: dict, labels: dict, per_task_loss: dict, example_mask_B, task_keys, *,
                 topk=DEFAULT_TOPK, null_class: bool = False, lca_CxC=None) -> dict:
  """{count key: float32 scalar} for one batch; jit-traceable (see the module docstring).

  Args:
    logits, labels: {task: (B, C) logits}, {task: (B,) int class}.
    per_task_loss: `losses.task_losses`' {task: TaskLoss}; `loss_sum`/`loss_n` follow its include
      mask and weights (so `loss` is the quantity training minimises), `loss_all_sum` and the
      null / non-null losses count every real example, unweighted.
    example_mask_B: False for padding rows, which count nowhere.
    task_keys: the tasks, finest first.
    topk: static tuple of k for `correct{k}/t` and `hdist{k}_sum`; top-1 is always counted.
    null_class: class 0 is the null label: null / non-null split and partial chain.
    lca_CxC: `lca_heights` of the finest task (a jnp array under jit): mistake severity and
      hierarchical distance@k counts; skipped when None.
  """
  topk = tuple(int(k) for k in topk)
  if any(k < 1 for k in topk):
    raise ValueError(f"metrics: top-k values must be >= 1, got {topk}")
  mask_B = jnp.asarray(example_mask_B).astype(bool)
  counts = {"n": jnp.sum(mask_B.astype(jnp.float32))}
  correct, top_idx = {}, {}
  for t in task_keys:
    top_idx[t] = _top_indices(logits[t], topk)
    task, correct[t] = _task_counts(t, logits[t], labels[t], per_task_loss[t], top_idx[t],
                                    topk, null_class, mask_B)
    counts.update(task)
  counts.update(_chain_counts(correct, labels, task_keys, mask_B, counts["n"], null_class))
  if lca_CxC is not None:
    t0 = task_keys[0]
    counts.update(_hierarchy_counts(t0, logits[t0], labels[t0], jnp.asarray(lca_CxC),
                                    top_idx[t0], topk, null_class, mask_B))
  return counts


def accumulate(total: dict | None, counts: dict) -> dict:
  """Host-side running sums (Python floats) of `batch_counts` dicts with the same keys."""
  counts = {k: float(np.asarray(v)) for k, v in counts.items()}
  if total is None:
    return counts
  if total.keys() != counts.keys():
    raise ValueError(f"metrics.accumulate: count keys differ: {sorted(total.keys() ^ counts)}")
  return {k: total[k] + counts[k] for k in total}


def _ratio(num: float, den: float, scale: float = 1.0) -> float:
  return scale * num / den if den > 0 else 0.0


def subset_membership(labels: dict, task_keys, names=(), task_S=None, cls_S=None,
                      rarity_bin_C=None, num_bins: int = 0) -> dict:
  """{subset name: (B,) bool}: taxa subset s holds the samples whose class at task
  `task_keys[task_S[s]]` is `cls_S[s]`; rarity bin b (`rarity_<b>`) those whose finest-rank
  class is in bin b (`rarity_bins`). Arrays may be traced; names and num_bins are static."""
  out = {}
  if len(names):
    labels_BxT = jnp.stack([labels[t] for t in task_keys], axis=1)
    member_BxS = labels_BxT[:, task_S] == cls_S[None, :]
    out.update({name: member_BxS[:, s] for s, name in enumerate(names)})
  if rarity_bin_C is not None:
    bins_B = rarity_bin_C[labels[task_keys[0]]]
    out.update({f"rarity_{b}": bins_B == b for b in range(num_bins)})
  return out


def subset_counts(logits: dict, labels: dict, example_mask_B, task_keys, members: dict) -> dict:
  """Per subset: `subset_n/<name>` and `subset_correct1/<name>/<task>` (sums, jit-traceable)."""
  out = {}
  for name, in_B in members.items():
    m = (in_B & example_mask_B).astype(jnp.float32)
    out[f"subset_n/{name}"] = jnp.sum(m)
    for t in task_keys:
      out[f"subset_correct1/{name}/{t}"] = jnp.sum(m * (jnp.argmax(logits[t], -1) == labels[t]))
  return out


def rarity_bins(counts_C: np.ndarray, percentiles, null_class: bool) -> np.ndarray:
  """(C,) bin per class: searchsorted(percentiles of the train class counts, count, 'right').

  The thresholds are percentiles of the counts of the classes present in training (the null
  class excluded); bins run from 0 (rarest) to len(percentiles)."""
  counts = np.asarray(counts_C)
  present = counts[(counts > 0) & (np.arange(len(counts)) >= int(null_class))]
  if not len(present) or not len(percentiles):
    return np.zeros(len(counts), np.int32)
  thresholds = np.percentile(present, percentiles)
  return np.searchsorted(thresholds, counts, side="right").astype(np.int32)


def finalize(total: dict, task_keys, task_weights=None) -> dict:
  """Values from summed counts; which metrics appear follows the count keys present.

  `loss/t` is the training criterion's mean (nulls masked and class weights as in the loss that
  produced the counts) and `loss` = sum_t w_t loss/t with the task weights `task_weights` (T,)
  (default ones), so that it is comparable with the train loss; `loss_all/t` and `loss_all` count
  every example, unweighted. A metric whose denominator is 0 (no null samples, no mistakes, ...)
  is reported as 0.0.
  """
  n = max(total["n"], 1.0)
  w_T = np.ones(len(task_keys)) if task_weights is None else np.asarray(task_weights, np.float64)
  out = {}
  for i, t in enumerate(task_keys):
    out[f"loss/{t}"] = _ratio(total[f"loss_sum/{t}"], total[f"loss_n/{t}"])
    out[f"loss_all/{t}"] = total[f"loss_all_sum/{t}"] / n
  out["loss"] = float(sum(w_T[i] * out[f"loss/{t}"] for i, t in enumerate(task_keys)))
  out["loss_all"] = sum(out[f"loss_all/{t}"] for t in task_keys)
  for t in task_keys:
    ks = sorted(int(m.group(1)) for key in total
                if (m := re.fullmatch(r"correct(\d+)/(.+)", key)) and m.group(2) == t)
    for k in ks:
      out[f"acc{k}/{t}"] = 100.0 * total[f"correct{k}/{t}"] / n
    for name in ("null", "non_null"):
      if f"{name}_n/{t}" in total:
        den = total[f"{name}_n/{t}"]
        out[f"acc1_{name}/{t}"] = _ratio(total[f"{name}_correct1/{t}"], den, 100.0)
        out[f"loss_{name}/{t}"] = _ratio(total[f"{name}_loss_sum/{t}"], den)
  out["chain_accuracy"] = 100.0 * total["chain_correct"] / n
  if "partial_chain_n" in total:
    out["partial_chain_accuracy"] = _ratio(total["partial_chain_correct"],
                                           total["partial_chain_n"], 100.0)
  t0 = task_keys[0]
  if f"mistake_n/{t0}" in total:
    out[f"mistake_severity/{t0}"] = _ratio(total[f"mistake_height_sum/{t0}"],
                                           total[f"mistake_n/{t0}"])
    for key in total:
      if m := re.fullmatch(r"hdist(\d+)_sum/(.+)", key):
        if m.group(2) == t0:
          out[f"hier_dist{m.group(1)}/{t0}"] = _ratio(total[key], total[f"hdist_n/{t0}"])
  for key in total:
    if m := re.fullmatch(r"subset_n/(.+)", key):
      for t in task_keys:
        out[f"subset_acc1/{m.group(1)}/{t}"] = _ratio(
            total[f"subset_correct1/{m.group(1)}/{t}"], total[key], 100.0)
  out["num_examples"] = int(total["n"])
  return out


# ----------------------------------------------------------------------------- per class


def class_counts(labels_B, logits_BxC, mask_B):
  """(3, C) float32 of one task: per class its support (real examples labelled with it), its
  correct top-1 predictions and the real examples predicted as it. Summed over batches and
  devices like the other counts; the null class (0) is a class like any other."""
  c = logits_BxC.shape[-1]
  m = mask_B.astype(jnp.float32)
  pred_B = jnp.argmax(logits_BxC, -1)
  zeros = jnp.zeros(c, jnp.float32)
  return jnp.stack([zeros.at[labels_B].add(m), zeros.at[labels_B].add(m * (pred_B == labels_B)),
                    zeros.at[pred_B].add(m)])


def per_class(counts_3xC, taxon_ids, train_counts) -> list[dict]:
  """One row per class from summed `class_counts`: top-1 (= recall: correct / support) and
  precision (correct / predicted) in percent, None where the denominator is 0."""
  support, correct, predicted = (np.asarray(x, np.int64) for x in counts_3xC)
  pct = lambda a, b: round(100.0 * a / b, 4) if b else None
  return [{"class": i, "taxon_id": int(taxon_ids[i]), "train_count": int(train_counts[i]),
           "support": int(support[i]), "correct": int(correct[i]),
           "predicted": int(predicted[i]), "top1": pct(correct[i], support[i]),
           "precision": pct(correct[i], predicted[i])} for i in range(len(support))]


def worst(rows: list[dict], k: int = 5) -> list[dict]:
  """The `k` classes with the lowest top-1 among those with validation examples (more
  examples first among equals: a class wrong on 10 of 10 before one wrong on 1 of 1)."""
  seen = [r for r in rows if r["support"] > 0]
  return sorted(seen, key=lambda r: (r["top1"], -r["support"], r["class"]))[:k]
