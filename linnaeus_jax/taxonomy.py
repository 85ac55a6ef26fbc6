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
