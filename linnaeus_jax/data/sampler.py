"""Training order: a pure function of (seed, epoch), with mixing partners adjacent.

Each epoch every training row appears exactly once. With the grouped sampler, rows of one group
(their class at `schedule.mix.group_levels[0]`) are shuffled and paired; a pair sits at batch
positions (2i, 2i+1) with `pair_ok=True`. Rows without a partner (odd leftovers, groups smaller
than `min_group_size`, excluded nulls) are paired with each other with `pair_ok=False`: trained,
never mixed. Units of two are shuffled globally and the epoch is cut into global batches, the
last one padded with rows -1 (masked out of the loss). Processes take disjoint slices of each batch.
"""

from __future__ import annotations

import numpy as np


def mix_groups(labels_NxT: np.ndarray, task_keys, config) -> np.ndarray:
  """(N,) group per row: its class at the mix level, -1 if it must not be mixed."""
  mix = config.schedule.mix
  level = list(task_keys).index(mix.group_levels[0])
  group = labels_NxT[:, level].astype(np.int64)
  counts = np.bincount(group, minlength=1)
  group = np.where(counts[group] >= mix.min_group_size, group, -1)
  if mix.exclude_null_samples and config.data.partial.levels:
    keys = list(mix.null_task_keys) or list(task_keys)
    cols = [list(task_keys).index(k) for k in keys]
    group = np.where(np.any(labels_NxT[:, cols] == 0, axis=1), -1, group)
  return group.astype(np.int32)


def epoch_order(group: np.ndarray, seed: int, epoch: int, global_batch: int):
  """(rows, pair_ok), a multiple of global_batch long; rows -1 are padding.

  The standard sampler is the same with every group -1 (no pairs).
  """
  n = len(group)
  rng = np.random.default_rng([seed, epoch])
  # Shuffle within groups: sort by (group, random key); rank of each row inside its group.
  order = np.lexsort((rng.random(n), group))
  g = group[order]
  starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
  sizes = np.diff(np.r_[starts, n])
  rank = np.arange(n) - np.repeat(starts, sizes)
  size = np.repeat(sizes, sizes)
  pairable = (g >= 0) & (rank < size - size % 2)
  first = pairable & (rank % 2 == 0)
  pairs = np.stack([order[first], order[np.flatnonzero(first) + 1]], axis=1)
  singles = rng.permutation(order[~pairable])
  if len(singles) % 2:
    singles = np.r_[singles, -1]
  units = np.concatenate([pairs, singles.reshape(-1, 2)])
  ok = np.r_[np.ones(len(pairs), bool), np.zeros(len(singles) // 2, bool)]
  perm = rng.permutation(len(units))
  rows, pair_ok = units[perm].reshape(-1), np.repeat(ok[perm], 2)
  pad = -len(rows) % global_batch  # whole global batches; -1 rows (padding) are masked out
  return np.r_[rows, np.full(pad, -1)], np.r_[pair_ok, np.zeros(pad, bool)]
