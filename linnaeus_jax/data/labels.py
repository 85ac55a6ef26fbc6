"""labels.h5 -> in-memory row tables (reference/data.md §2, §7, §8).

Every label and metadata column is read into numpy once; class maps, validity flags, row filters
and the single-file split are vectorised. Only image decoding happens per sample (pipeline.py).
"""

from __future__ import annotations

import dataclasses
import logging

import h5py
import numpy as np

from linnaeus_jax import config as config_lib

# Raw columns that, when present, give a component's validity explicitly (Decision 4).
RAW_VALIDITY = {"SPATIAL": ("raw_lat", "raw_lon"), "TEMPORAL": ("raw_date_observed",),
                "ELEVATION": ("raw_elevation",)}


class DataError(ValueError):
  """A problem with the data files; the message lists every problem found."""


@dataclasses.dataclass
class RowTable:
  """The N rows of one split that survived the filters."""
  raw_row: np.ndarray  # (N,) int64 row in its labels file
  image_id: np.ndarray  # (N,) object str
  labels: np.ndarray  # (N, T) int32 class indices
  meta: dict[str, np.ndarray]  # component -> (N, dim) float32, zeros where invalid
  meta_valid: np.ndarray  # (N, C) bool, C in packing order

  def __len__(self) -> int:
    return len(self.raw_row)

  def take(self, idx: np.ndarray) -> "RowTable":
    return RowTable(self.raw_row[idx], self.image_id[idx], self.labels[idx],
                    {k: v[idx] for k, v in self.meta.items()}, self.meta_valid[idx])


@dataclasses.dataclass
class Dataset:
  train: RowTable
  val: RowTable
  task_keys: list[str]
  components: list[tuple[str, int]]  # (name, dim) in packing order
  class_to_idx: dict[str, dict]  # task -> {raw taxon id (or "null"): class index}
  num_classes: dict[str, int]
  hierarchy: dict[str, dict[int, int]]  # child task -> {child class: parent class}
  filter_counts: dict[str, int]  # rows dropped by each filter, in order
  train_images: str  # folder or images.h5 path
  val_images: str

  def summary(self) -> str:
    drops = ", ".join(f"{k}: {v}" for k, v in self.filter_counts.items())
    classes = ", ".join(f"{t}: {n}" for t, n in self.num_classes.items())
    return (f"{len(self.train)} train / {len(self.val)} val rows; classes {classes}; "
            f"dropped {drops or 'none'}")


def _decode(arr: np.ndarray) -> np.ndarray:
  return np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr],
                  dtype=object)


def _read(path: str, task_keys, components, problems: list[str]) -> dict | None:
  """Reads the columns of one labels file; appends schema problems instead of raising."""
  try:
    h5 = h5py.File(path, "r")
  except OSError as e:
    problems.append(f"cannot open labels file {path}: {e}")
    return None
  with h5:
    cols: dict = {}
    if "img_identifiers" not in h5:
      problems.append(f"{path}: missing dataset 'img_identifiers'")
      return None
    cols["image_id"] = _decode(h5["img_identifiers"][:])
    n = len(cols["image_id"])
    for t in task_keys:
      if t not in h5:
        problems.append(f"{path}: missing task dataset {t!r} (data.task_keys_h5)")
      elif h5[t].shape != (n,):
        problems.append(f"{path}: {t} has shape {h5[t].shape}, expected ({n},)")
      else:
        cols[t] = h5[t][:].astype(np.int64)
    for name, comp in components:
      src = comp.source
      if src not in h5:
        problems.append(f"{path}: missing source dataset {src!r} of component {name}")
        continue
      ds = h5[src]
      data = ds[:].astype(np.float32)
      if data.ndim == 1:
        data = data[:, None]
      if data.shape[0] != n:
        problems.append(f"{path}: {src} has {data.shape[0]} rows, expected {n}")
        continue
      if comp.columns:
        names = [x.decode() if isinstance(x, bytes) else str(x)
                 for x in ds.attrs.get("column_names", [])]
        missing = [c for c in comp.columns if c not in names]
        if missing:
          problems.append(f"{path}: columns {missing} of component {name} not in {src}'s "
                          f"column_names {names}")
          continue
        data = data[:, [names.index(c) for c in comp.columns]]
      if data.shape[1] != comp.dim:
        problems.append(f"{path}: {src} has width {data.shape[1]} but component {name} has "
                        f"dim {comp.dim}")
        continue
      cols[f"meta/{name}"] = data
      cols[f"valid/{name}"] = _validity(h5, name, src, data)
    cols["in_region"] = h5["in_region"][:].astype(bool) if "in_region" in h5 else None
  return cols


_warned: set[str] = set()


def _validity(h5, name: str, source: str, data: np.ndarray) -> np.ndarray:
  """Explicit validity: `<source>_valid`, else raw columns, else the original's value rules."""
  if f"{source}_valid" in h5:
    return h5[f"{source}_valid"][:].astype(bool)
  raw = RAW_VALIDITY.get(name.upper())
  if raw and all(r in h5 for r in raw):
    valid = np.ones(len(data), bool)
    for r in raw:
      col = h5[r][:]
      if col.dtype.kind in "SOU":
        valid &= np.array([len(x) > 0 for x in col])
      else:
        valid &= np.isfinite(col.astype(np.float64))
    return valid
  if name not in _warned:
    _warned.add(name)
    logging.warning("component %s: no %s_valid or raw columns; validity inferred from values "
                    "(a real 0 m elevation or lat/lon 0 then counts as missing)", name, source)
  if name.upper() == "ELEVATION":
    null = np.tile(np.array([0.0, 1.0], np.float32), data.shape[1] // 2)
    return ~np.all(np.isclose(data, null), axis=1)
  return np.any(data != 0, axis=1) & np.all(np.isfinite(data), axis=1)


def _class_maps(files: list[dict], task_keys, partial: bool):
  maps, num = {}, {}
  for t in task_keys:
    ids = np.unique(np.concatenate([f[t] for f in files]))
    ids = ids[ids != 0]
    m = {"null": 0} if partial else {}
    m.update({int(i): k + int(partial) for k, i in enumerate(ids)})
    maps[t], num[t] = m, len(m)
  return maps, num


def _to_index(raw: np.ndarray, class_map: dict, partial: bool) -> np.ndarray:
  ids = np.array(sorted(k for k in class_map if k != "null"), dtype=np.int64)
  pos = np.searchsorted(ids, raw)
  out = (np.minimum(pos, len(ids) - 1) + int(partial)).astype(np.int32)
  if partial:
    out[raw == 0] = 0
  return out


def _filter(cols: dict, config, components, counts: dict) -> np.ndarray:
  """Row indices surviving the filters of data.md §2.3, in the original's order."""
  d = config.data
  tasks = list(d.task_keys_h5)
  keep = np.ones(len(cols["image_id"]), bool)

  def drop(name, mask):
    counts[name] = counts.get(name, 0) + int(np.sum(keep & mask))
    keep[mask] = False
  if cols["in_region"] is not None and not d.out_of_region.include:
    drop("out_of_region", ~cols["in_region"])
  for name, comp in components:
    if not comp.allow_missing:
      drop(f"missing_{name}", ~cols[f"valid/{name}"])
  labels = np.stack([cols[t] for t in tasks], axis=1)
  drop("all_null", np.all(labels == 0, axis=1))
  if not d.partial.levels:
    drop("any_null", np.any(labels == 0, axis=1))
  if d.upward_major_check:
    nonzero = labels != 0
    highest = np.where(nonzero.any(1), labels.shape[1] - 1 - np.argmax(nonzero[:, ::-1], 1), -1)
    below = np.arange(labels.shape[1])[None, :] <= highest[:, None]
    drop("upward_major", np.any(below & ~nonzero, axis=1))
  return np.flatnonzero(keep)


def _table(cols: dict, rows: np.ndarray, config, components, maps) -> RowTable:
  partial = config.data.partial.levels
  labels = np.stack([_to_index(cols[t][rows], maps[t], partial)
                     for t in config.data.task_keys_h5], axis=1)
  valid = np.zeros((len(rows), len(components)), bool)
  meta = {}
  for c, (name, comp) in enumerate(components):
    v = cols[f"valid/{name}"][rows].copy()
    if comp.oor_mask and cols["in_region"] is not None:
      v &= cols["in_region"][rows]
    valid[:, c] = v
    meta[name] = np.where(v[:, None], np.nan_to_num(cols[f"meta/{name}"][rows]), 0.0).astype(
        np.float32)
  return RowTable(rows.astype(np.int64), cols["image_id"][rows], labels, meta, valid)


def _hierarchy(files: list[dict], task_keys, maps, partial, problems) -> dict:
  """child task -> {child class: parent class} from co-occurring adjacent ranks."""
  out = {}
  for child, parent in zip(task_keys, task_keys[1:]):
    pairs = np.unique(np.concatenate([np.stack([f[child], f[parent]], 1) for f in files]), axis=0)
    pairs = pairs[(pairs[:, 0] != 0) & (pairs[:, 1] != 0)]
    c_idx = _to_index(pairs[:, 0], maps[child], partial)
    p_idx = _to_index(pairs[:, 1], maps[parent], partial)
    uniq, counts = np.unique(c_idx, return_counts=True)
    for bad in uniq[counts > 1]:
      raw_c = pairs[c_idx == bad, 0][0]
      problems.append(f"taxon {raw_c} ({child}) has several parents in {parent}: "
                      f"{sorted(int(p) for p in pairs[c_idx == bad, 1])}")
    out[child] = {int(c): int(p) for c, p in zip(c_idx, p_idx)}
  return out


def load(config) -> Dataset:
  """Builds the train and val row tables from config.data; raises DataError listing problems."""
  d = config.data
  tasks = list(d.task_keys_h5)
  components = config_lib.enabled_components(config)
  problems: list[str] = []
  two_files = bool(d.h5.train_labels_path)
  paths = [d.h5.train_labels_path] + ([d.h5.val_labels_path] if d.h5.val_labels_path else []) \
      if two_files else [d.h5.labels_path]
  files = [_read(p, tasks, components, problems) for p in paths]
  if problems:
    raise DataError("Data schema check failed:\n  " + "\n  ".join(problems))
  partial = d.partial.levels
  maps, num = _class_maps(files, tasks, partial)
  hierarchy = _hierarchy(files, tasks, maps, partial, problems)
  if problems:
    raise DataError("Data schema check failed:\n  " + "\n  ".join(problems))
  counts: dict[str, int] = {}
  tables = [_table(f, _filter(f, config, components, counts), config, components, maps)
            for f in files]
  if two_files:
    train = tables[0]
    val = tables[1] if len(tables) > 1 else tables[0].take(np.zeros(0, np.int64))
    train_images = d.h5.train_images_path or d.hybrid.images_dir
    val_images = d.h5.val_images_path or d.hybrid.images_dir
  else:
    n = len(tables[0])
    perm = np.random.RandomState(d.h5.train_val_split_seed).permutation(n)
    n_train = int(n * d.h5.train_val_split_ratio)
    train, val = tables[0].take(perm[:n_train]), tables[0].take(perm[n_train:])
    train_images = val_images = d.hybrid.images_dir if d.hybrid.use_hybrid else d.h5.images_path
  if not train_images:
    raise DataError("no images: set data.hybrid.use_hybrid + data.hybrid.images_dir, or "
                    "data.h5.images_path")
  if len(train) == 0:
    raise DataError(f"no training rows survive the filters (dropped: {counts})")
  return Dataset(train=train, val=val, task_keys=tasks,
                 components=[(n, c.dim) for n, c in components], class_to_idx=maps,
                 num_classes=num, hierarchy=hierarchy, filter_counts=counts,
                 train_images=train_images, val_images=val_images)


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder, reshuffled each epoch, is left out)."""
  if n_rows < global_batch:
    raise DataError(f"{n_rows} training rows cannot fill one batch of {global_batch}")
  return n_rows // global_batch
