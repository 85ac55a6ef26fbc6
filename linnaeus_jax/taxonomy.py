"""The taxonomy tree over class indices: parent links between adjacent ranks, vectorised.

Tasks are ordered finest first (`taxa_L10, taxa_L20, ...`); `parents[child_task][c]` is the class
index of class c's parent at the next coarser task, or -1 (no known parent, e.g. the null class).
Saved in the original's `taxonomy_tree.json` format (`hierarchy_map_raw`).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np


class TaxonomyError(ValueError):
  pass


@dataclasses.dataclass
class TaxonomyTree:
  task_keys: list[str]
  num_classes: dict[str, int]
  parents: dict[str, np.ndarray]  # child task -> (C_child,) int32 parent class or -1

  @classmethod
  def from_labels(cls, labels_NxT: np.ndarray, task_keys, num_classes, *, null_class: bool,
                  resolve: str = "error", names: dict | None = None) -> "TaxonomyTree":
    """Links from co-occurring (child, parent) classes of adjacent ranks in the given rows.

    A child seen with several parents is an error naming the taxa (`names[task][class]`, e.g.
    raw taxon ids), or with resolve='majority' the parent seen most often wins, with a warning.
    """
    name = (lambda t, k: names[t][k]) if names else (lambda t, k: k)
    parents, problems = {}, []
    for i, (child, parent) in enumerate(zip(task_keys, task_keys[1:])):
      c, p = labels_NxT[:, i].astype(np.int64), labels_NxT[:, i + 1].astype(np.int64)
      if null_class:
        keep = (c != 0) & (p != 0)
        c, p = c[keep], p[keep]
      n_p = num_classes[parent]
      keys, counts = np.unique(c * n_p + p, return_counts=True)
      kc, kp = keys // n_p, keys % n_p
      out = np.full(num_classes[child], -1, np.int32)
      multi = np.flatnonzero(np.bincount(kc, minlength=num_classes[child]) > 1)
      if len(multi) and resolve != "majority":
        for m in multi[:20]:
          problems.append(f"taxon {name(child, int(m))} ({child}) has several parents in "
                          f"{parent}: {sorted(int(name(parent, int(x))) for x in kp[kc == m])}")
        if len(multi) > 20:
          problems.append(f"... and {len(multi) - 20} more multi-parent classes in {child}")
        continue
      if len(multi):
        logging.warning("%d %s classes have several parents; keeping the most frequent",
                        len(multi), child)
      # Sort by (child, count) so that the most frequent parent of each child comes last.
      order = np.lexsort((counts, kc))
      out[kc[order]] = kp[order]
      parents[child] = out
    if problems:
      raise TaxonomyError("Taxonomy problems:\n  " + "\n  ".join(problems))
    return cls(list(task_keys), dict(num_classes), parents)

  def hierarchy_map(self) -> dict[str, dict[int, int]]:
    return {t: {int(c): int(p) for c, p in enumerate(par) if p >= 0}
            for t, par in self.parents.items()}

  def matrix(self, child_task: str) -> np.ndarray:
    """H[parent, child] = 1 iff parent is child's parent (parent task = the next coarser)."""
    i = self.task_keys.index(child_task)
    par = self.parents[child_task]
    h = np.zeros((self.num_classes[self.task_keys[i + 1]], len(par)), np.float32)
    known = par >= 0
    h[par[known], np.flatnonzero(known)] = 1.0
    return h

  def to_json(self) -> str:
    return json.dumps({"__taxonomy_tree_version__": "1.0", "task_keys": self.task_keys,
                       "num_classes": self.num_classes,
                       "hierarchy_map_raw": {t: {str(c): p for c, p in m.items()}
                                             for t, m in self.hierarchy_map().items()}}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "TaxonomyTree":
    d = json.loads(text)
    tasks, num = d["task_keys"], {k: int(v) for k, v in d["num_classes"].items()}
    parents = {}
    for child, parent in zip(tasks, tasks[1:]):
      out = np.full(num[child], -1, np.int32)
      for c, p in d.get("hierarchy_map_raw", {}).get(child, {}).items():
        if not (0 <= int(c) < num[child] and 0 <= int(p) < num[parent]):
          raise TaxonomyError(f"taxonomy link {child}[{c}] -> {parent}[{p}] is out of range")
        out[int(c)] = int(p)
      parents[child] = out
    return cls(tasks, num, parents)

  def ancestors(self, task: str, *, null_class: bool = False) -> np.ndarray:
    """(R, C) ancestor indices of `task`'s classes: row k = the ancestor k ranks up, -1 unknown.

    Row 0 is the class itself; R = number of ranks from `task` to the top. With `null_class`,
    class 0 (null) at any rank counts as unknown: it has no parent and is nobody's ancestor.
    """
    i = self.task_keys.index(task)
    rows = [np.arange(self.num_classes[task], dtype=np.int64)]
    for child in self.task_keys[i:-1]:
      prev = rows[-1]
      par = self.parents.get(child, np.full(self.num_classes[child], -1, np.int32))
      known = (prev > 0) if null_class else (prev >= 0)
      up = np.where(known, par[np.maximum(prev, 0)], -1).astype(np.int64)
      rows.append(np.where(up == 0, -1, up) if null_class else up)
    return np.stack(rows)


def _edge_weights(anc_RxC: np.ndarray, rows_N: np.ndarray, beta: float) -> np.ndarray:
  """(N, C) exp(-beta d) for the given rows, d = 2k for the lowest common ancestor k ranks up.

  Pairs with no common known ancestor get 0 (d = inf), and the diagonal 0 (w_ii = 0).
  """
  w_NxC = np.zeros((len(rows_N), anc_RxC.shape[1]))
  # Coarsest first, so that the lowest common ancestor (smallest k) is written last.
  for k in range(anc_RxC.shape[0] - 1, 0, -1):
    a_N = anc_RxC[k, rows_N]
    same_NxC = (a_N[:, None] == anc_RxC[k][None, :]) & (a_N >= 0)[:, None]
    w_NxC[same_NxC] = np.exp(-beta * 2.0 * k)
  w_NxC[np.arange(len(rows_N)), rows_N] = 0.0
  return w_NxC


def smoothing_matrices(tree: TaxonomyTree, enabled, alpha: float, beta: float,
                       uniform_roots: bool, fallback_to_uniform: bool, null_class: bool,
                       block: int = 512) -> dict[str, np.ndarray]:
  """Taxonomy-aware label-smoothing matrices T (C, C) float32 for the enabled tasks
  (docs/training.md#losses).

  `enabled` is a per-task flag list in `tree.task_keys` order (missing entries are False).
  T_ii = 1 - alpha; T_ij = alpha * w_ij / sum_k w_ik, w_ij = exp(-beta d_ij), d_ij = tree edges
  between i and j through their lowest common ancestor (siblings 2, cousins 4; inf -> w = 0).
  Uniform rows (alpha / (C - 1) off the diagonal) where sum_k w_ik < 1e-9, or where the class has
  no parent and `uniform_roots`. A rank where no class has a parent (the top rank) is uniform with
  `fallback_to_uniform`, else a ValueError. Rows are renormalised to sum 1. Vectorised, built in
  row blocks of `block` so that temporaries stay O(block * C).
  """
  out = {}
  for task, on in zip(tree.task_keys, enabled):
    if not on:
      continue
    c = tree.num_classes[task]
    if c == 1:
      out[task] = np.ones((1, 1), np.float32)
      continue
    anc_RxC = tree.ancestors(task, null_class=null_class)
    has_parent_C = anc_RxC[1] >= 0 if len(anc_RxC) > 1 else np.zeros(c, bool)
    level_uniform = not has_parent_C.any()
    if level_uniform and not fallback_to_uniform:
      raise ValueError(f"taxonomy smoothing for task {task!r}: no class at this rank has a parent "
                       "(e.g. the top rank), so no distance-based matrix can be built; disable it "
                       "for this task or set loss.taxonomy_smoothing.fallback_to_uniform")
    t_CxC = np.empty((c, c), np.float32)
    for start in range(0, c, block):
      rows_N = np.arange(start, min(start + block, c))
      if level_uniform:
        w_NxC, uniform_N = np.zeros((len(rows_N), c)), np.ones(len(rows_N), bool)
      else:
        w_NxC = _edge_weights(anc_RxC, rows_N, beta)
        uniform_N = w_NxC.sum(1) < 1e-9
        if uniform_roots:
          uniform_N |= ~has_parent_C[rows_N]
      total_N = np.where(uniform_N, 1.0, w_NxC.sum(1))
      rows_NxC = np.where(uniform_N[:, None], alpha / (c - 1), alpha * w_NxC / total_N[:, None])
      rows_NxC[np.arange(len(rows_N)), rows_N] = 1.0 - alpha
      t_CxC[rows_N] = rows_NxC / rows_NxC.sum(1, keepdims=True)
    out[task] = t_CxC
  return out
