"""labels.h5 -> in-memory row tables (docs/data.md, docs/design.md#vectorised-data-loading).

Every label and metadata column is read into numpy once; class maps, validity flags, row filters,
the single-file split and the taxonomy are vectorised. Only image decoding happens per sample
(pipeline.py). Problems with the files are collected and raised together as a DataError:
among them negative taxon ids and image identifiers that resolve outside the images folder, each
naming the rows. NaN or inf in an encoded metadata column makes that component invalid (and
zeroed) on that row whatever its validity source says; such rows are counted per component
(`Dataset.nonfinite_meta`) and logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import h5py
import numpy as np

from linnaeus_jax import config as config_lib
from linnaeus_jax import taxonomy as taxonomy_lib
from linnaeus_jax.data import encoders, images as images_lib

# Raw columns that, when present, give a component's validity explicitly
# (docs/design.md#metadata-masking-by-validity-flags).
RAW_VALIDITY = {"SPATIAL": ("raw_lat", "raw_lon"), "TEMPORAL": ("raw_date_observed",),
                "ELEVATION": ("raw_elevation",)}
FILTERS = ("missing_image", "out_of_region", "missing_meta", "all_null", "any_null",
           "upward_major")


class DataError(ValueError):
  """A problem with the data files; the message lists every problem found."""


@dataclasses.dataclass
class RowTable:
  """The N rows of one split that survived the filters."""
  raw_row: np.ndarray  # (N,) int64 row in its labels file
  image_id: np.ndarray  # (N,) identifiers as stored (bytes or str)
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
  taxonomy: taxonomy_lib.TaxonomyTree
  rows_total: int  # rows in the labels file(s)
  dropped: dict[str, int]  # rows dropped by each filter, in order
  missing_images: dict[str, list[str]]  # split -> identifiers excluded as missing
  train_images: str  # folder, images.h5 path or shard set (glob / comma-separated paths)
  val_images: str
  # component -> rows (of the labels files, before filtering) whose validity source says valid
  # but whose encoded values hold NaN or inf; made invalid and zeroed
  nonfinite_meta: dict[str, int] = dataclasses.field(default_factory=dict)
  # task -> {raw taxon id as str: name}, from the builder's taxa.json beside the (train) labels
  # file; empty without one (taxa are then shown by id)
  taxon_names: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

  def name(self, task: str, class_index: int) -> str:
    """The taxon name of a class (its raw id without a name; 'null' for the null class)."""
    raw = {v: k for k, v in self.class_to_idx[task].items()}.get(class_index, class_index)
    return self.taxon_names.get(task, {}).get(str(raw), str(raw))

  def summary(self) -> str:
    drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items() if v)
    classes = ", ".join(f"{t}: {n}" for t, n in self.num_classes.items())
    return (f"{len(self.train)} train / {len(self.val)} val rows of {self.rows_total}; "
            f"classes {classes}; dropped {drops or 'none'}")

  def write_assets(self, folder: str) -> None:
    """The JSON assets, plus `split_rows.npz`: the raw labels-file rows of train and val."""
    os.makedirs(folder, exist_ok=True)
    for name, text in self.assets().items():  # each replaced whole
      with open(os.path.join(folder, name + ".tmp"), "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
    with open(os.path.join(folder, "split_rows.npz.tmp"), "wb") as f:
      np.savez_compressed(f, train=self.train.raw_row, val=self.val.raw_row)
    os.replace(os.path.join(folder, "split_rows.npz.tmp"), os.path.join(folder, "split_rows.npz"))

  def assets(self) -> dict[str, str]:
    """JSON assets in the original's formats: file name -> text."""
    counts = {t: np.bincount(self.train.labels[:, j], minlength=self.num_classes[t]).tolist()
              for j, t in enumerate(self.task_keys)}
    return {
        "class_to_idx.json": json.dumps({t: {str(k): v for k, v in m.items()}
                                         for t, m in self.class_to_idx.items()}, indent=1),
        "num_classes.json": json.dumps(self.num_classes, indent=1),
        "taxonomy_tree.json": self.taxonomy.to_json(),
        "class_label_counts.json": json.dumps({"train": counts}),
        "data_summary.json": json.dumps(self.facts(), indent=1),
        **({"taxon_names.json": json.dumps(self.taxon_names, indent=1)}
           if self.taxon_names else {}),
    }

  def facts(self) -> dict:
    """Rows per split, classes per rank (null included) and, per metadata component, the
    fraction of rows where it is valid: the data section of a model card."""
    valid = lambda t: {n: round(float(t.meta_valid[:, c].mean()), 4) if len(t) else None
                       for c, (n, _) in enumerate(self.components)}
    return {"rows": {"train": len(self.train), "val": len(self.val), "total": self.rows_total},
            "dropped": {k: int(v) for k, v in self.dropped.items()},
            "classes": dict(self.num_classes),
            "metadata_valid_fraction": {"train": valid(self.train), "val": valid(self.val)}}


def _image_ids(h5) -> np.ndarray:
  """`img_identifiers` as stored; variable-length strings as compact fixed-width bytes rather
  than Python objects."""
  ids = h5["img_identifiers"][:]
  if ids.dtype == object:
    ids = np.array([x.encode() if isinstance(x, str) else x for x in ids], dtype="S") \
        if len(ids) and isinstance(ids[0], str) else ids.astype("S")
  return ids


def _read_task(h5, path: str, t: str, n: int, problems: list[str]) -> np.ndarray | None:
  """The (n,) raw taxon ids of task `t`, or None when the dataset is missing or malformed;
  appends the problems (negative ids too, though the column is still returned)."""
  if t not in h5:
    problems.append(f"{path}: missing task dataset {t!r} (data.task_keys_h5)")
  elif h5[t].shape != (n,):
    problems.append(f"{path}: {t} has shape {h5[t].shape}, expected ({n},)")
  elif h5[t].dtype.kind not in "iu":
    problems.append(f"{path}: {t} has dtype {h5[t].dtype}, expected integer taxon ids")
  else:
    col = h5[t][:]
    negative = np.flatnonzero(col < 0) if h5[t].dtype.kind == "i" else []
    if len(negative):
      problems.append(f"{path}: {t} has {len(negative)} negative taxon ids (ids are >= 0, "
                      f"0 = unknown): {_rows_listing(negative, col[negative].tolist())}")
    return col
  return None


def _read_component(h5, path: str, name: str, comp, n: int,
                    problems: list[str]) -> np.ndarray | None:
  """The (n, dim) float32 values of metadata component `name` (its `columns` picked by
  `column_names` when set), or None with the problem appended."""
  src = comp.source
  if src not in h5:
    problems.append(f"{path}: missing source dataset {src!r} of component {name}")
    return None
  ds = h5[src]
  if ds.dtype.kind not in "fiu":
    problems.append(f"{path}: {src} has dtype {ds.dtype}, expected numbers")
    return None
  data = np.asarray(ds[:], np.float32)
  if data.ndim == 1:
    data = data[:, None]
  if data.shape[0] != n:
    problems.append(f"{path}: {src} has {data.shape[0]} rows, expected {n}")
    return None
  if comp.columns:
    names = [x.decode() if isinstance(x, bytes) else str(x)
             for x in ds.attrs.get("column_names", [])]
    missing = [c for c in comp.columns if c not in names]
    if missing:
      problems.append(f"{path}: columns {missing} of component {name} not in {src}'s "
                      f"column_names {names}")
      return None
    data = data[:, [names.index(c) for c in comp.columns]]
  if data.shape[1] != comp.dim:
    problems.append(f"{path}: {src} has width {data.shape[1]} but component {name} has "
                    f"dim {comp.dim}")
    return None
  return data


def _read(path: str, task_keys, components, problems: list[str]) -> dict | None:
  """Reads the columns of one labels file; appends schema problems instead of raising."""
  try:
    h5 = h5py.File(path, "r", locking=False)
  except (OSError, FileNotFoundError) as e:
    problems.append(f"cannot open labels file {path}: {e}")
    return None
  with h5:
    cols: dict = {"path": path}
    if "img_identifiers" not in h5:
      problems.append(f"{path}: missing dataset 'img_identifiers'")
      return None
    cols["image_id"] = _image_ids(h5)
    n = cols["n"] = len(cols["image_id"])
    for t in task_keys:
      col = _read_task(h5, path, t, n, problems)
      if col is not None:
        cols[t] = col
    for name, comp in components:
      data = _read_component(h5, path, name, comp, n, problems)
      if data is None:
        continue
      cols[f"meta/{name}"] = data
      valid, finite = _validity(h5, name, comp.source, data), np.all(np.isfinite(data), axis=1)
      cols[f"valid/{name}"] = valid & finite  # NaN/inf never reaches the model
      cols[f"nonfinite/{name}"] = int(np.sum(valid & ~finite))
    if "in_region" in h5:
      cols["in_region"] = h5["in_region"][:].astype(bool)
  return cols


def _rows_listing(rows: np.ndarray, values, limit: int = 10) -> str:
  """`rows 3 (-5), 7 (-1), ... (12 in all)`: the first `limit` rows with their values."""
  shown = ", ".join(f"{r} ({v})" for r, v in zip(rows[:limit], values[:limit]))
  return "rows " + shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


_warned: set[str] = set()


def _validity(h5, name: str, source: str, data: np.ndarray) -> np.ndarray:
  """Explicit validity: `<source>_valid`, else raw columns, else the original's value rules.

  Finiteness is not checked here: the caller clears rows with NaN/inf values and counts them.
  """
  if f"{source}_valid" in h5:
    return h5[f"{source}_valid"][:].astype(bool)
  raw = RAW_VALIDITY.get(name.upper())
  if raw and all(r in h5 for r in raw):
    valid = np.ones(len(data), bool)
    for r in raw:
      ds, step = h5[r], 1 << 20  # in chunks: string columns are large as Python objects
      for a in range(0, len(data), step):
        col = ds[a:a + step]
        if col.dtype.kind in "SOU":
          valid[a:a + step] &= np.char.str_len(col.astype("S")) > 0
        else:
          valid[a:a + step] &= np.isfinite(col)
    return valid
  if name not in _warned:
    _warned.add(name)
    logging.warning("component %s: no %s_valid or raw columns; validity inferred from values "
                    "(a real 0 m elevation or lat/lon 0 then counts as missing)", name, source)
  null = encoders.original_null_form(name, data.shape[1])
  return ~np.all(data == null, axis=1)


def _class_maps(files: list[dict], task_keys, partial: bool):
  """Sorted non-null ids of all files (before filtering) -> indices; 0 = null with partial."""
  maps, num, index = {}, {}, {}
  for t in task_keys:
    ids, inv = np.unique(np.concatenate([f[t] for f in files]), return_inverse=True)
    has_zero = len(ids) and ids[0] == 0
    real = ids[1:] if has_zero else ids
    m = {"null": 0} if partial else {}
    m.update({int(i): k + int(partial) for k, i in enumerate(real)})
    maps[t], num[t] = m, len(m)
    idx = (inv - int(has_zero) + int(partial)).astype(np.int32)
    if has_zero and partial:
      idx[inv == 0] = 0
    index[t] = np.split(idx, np.cumsum([f["n"] for f in files])[:-1])
  return maps, num, index


def _filter(cols: dict, missing_image: np.ndarray | None, config, components,
            dropped: dict) -> np.ndarray:
  """Rows surviving the filters (docs/data.md#classes-filters-and-the-taxonomy), in the
  original's order."""
  d = config.data
  keep = np.ones(cols["n"], bool)

  def drop(name, mask):
    dropped[name] += int(np.sum(keep & mask))
    keep[mask] = False
  if missing_image is not None:
    drop("missing_image", missing_image)
  if "in_region" in cols and not d.out_of_region.include:
    drop("out_of_region", ~cols["in_region"])
  for name, comp in components:
    if not comp.allow_missing:
      drop("missing_meta", ~cols[f"valid/{name}"])
  raw = np.stack([cols[t] for t in d.task_keys_h5], axis=1)
  drop("all_null", np.all(raw == 0, axis=1))
  if not d.partial.levels:
    drop("any_null", np.any(raw == 0, axis=1))
  if d.upward_major_check:
    nonzero = raw != 0
    highest = np.where(nonzero.any(1), raw.shape[1] - 1 - np.argmax(nonzero[:, ::-1], 1), -1)
    below = np.arange(raw.shape[1])[None, :] <= highest[:, None]
    drop("upward_major", np.any(below & ~nonzero, axis=1))
  return np.flatnonzero(keep)


def _table(cols: dict, labels: np.ndarray, rows: np.ndarray, components) -> RowTable:
  """The rows `rows` of one file, in that order."""
  valid = np.zeros((len(rows), len(components)), bool)
  meta = {}
  for c, (name, comp) in enumerate(components):
    v = cols[f"valid/{name}"][rows]
    if comp.oor_mask and "in_region" in cols:
      # oor_mask clears the validity flag (docs/design.md#metadata-masking-by-validity-flags)
      v = v & cols["in_region"][rows]
    valid[:, c] = v
    m = cols[f"meta/{name}"][rows]
    meta[name] = np.where(v[:, None] & np.isfinite(m), m, 0.0).astype(np.float32)
  return RowTable(rows.astype(np.int64), cols["image_id"][rows], labels[rows], meta, valid)


def _paths(d, problems: list[str]) -> tuple[list[str], list[str]]:
  """(labels files, image locations) for the modes of docs/data.md#modes; others are problems.

  Two files (train + val, or train only: empty validation), or one file split by seed.
  """
  h5 = d.h5
  if h5.train_labels_path:
    if h5.labels_path:
      problems.append("both data.h5.labels_path (one file, split by seed) and "
                      "data.h5.train_labels_path (two files) are set: set only one")
    labels = [h5.train_labels_path] + ([h5.val_labels_path] if h5.val_labels_path else [])
    imgs = [h5.train_images_path or d.hybrid.images_dir,
            h5.val_images_path or d.hybrid.images_dir][:len(labels)]
    return labels, imgs
  if h5.val_labels_path:
    problems.append("data.h5.val_labels_path is set without data.h5.train_labels_path")
  if not h5.labels_path:
    problems.append("no labels: set data.h5.labels_path (one file) or "
                    "data.h5.train_labels_path + val_labels_path (two files)")
  return [h5.labels_path], [d.hybrid.images_dir if d.hybrid.use_hybrid else h5.images_path]


def _image_location_problems(image_paths: list[str]) -> list[str]:
  """Problems with the image locations: unset, or a folder that does not exist."""
  problems = []
  for p in image_paths:
    if not p:
      problems.append("no images: set data.hybrid.use_hybrid + data.hybrid.images_dir, or "
                      "data.h5.images_path (images.h5, or image shards: a glob or "
                      "comma-separated paths; two files: data.h5.train_images_path, "
                      "val_images_path)")
    elif not images_lib.is_h5(p) and not os.path.isdir(p):
      problems.append(f"images folder {p} does not exist")
  return problems


def _image_id_problems(files: list[dict | None], image_paths: list[str]) -> list[str]:
  """Problems with the image identifiers: those that resolve outside their images folder, then
  the row counts and shard tiling of images.h5 or a shard set."""
  problems = []
  for f, loc in zip(files, image_paths):
    if f is not None and loc and not images_lib.is_h5(loc):
      outside = np.flatnonzero(images_lib.outside_folder(f["image_id"]))
      if len(outside):
        ids = [repr(images_lib.to_str(x)) for x in f["image_id"][outside[:10]]]
        problems.append(f"{f['path']}: {len(outside)} image identifiers resolve outside the "
                        f"images folder {loc} (absolute, or climbing out with '..'): "
                        f"{_rows_listing(outside, ids)}")
  for f, loc in zip(files, image_paths):
    if f is not None and loc and images_lib.is_h5(loc):
      problems += images_lib.check_h5(loc, f["n"])
  return problems


def _nonfinite_counts(files: list[dict], components) -> dict[str, int]:
  """{component: rows made invalid for NaN or inf values}, over all files; logged when any."""
  nonfinite = {name: sum(f[f"nonfinite/{name}"] for f in files) for name, _ in components}
  if any(nonfinite.values()):
    logging.warning("NaN or inf in encoded metadata: the component is marked invalid and zeroed "
                    "on those rows (rows per component: %s)",
                    ", ".join(f"{k}: {v}" for k, v in nonfinite.items() if v))
  return nonfinite


def _absent_images(f: dict, loc: str, d, split: str, missing: dict) -> np.ndarray | None:
  """Checks the image files of a folder when asked (data.hybrid), recording the missing ones
  in `missing[split]`; the (N,) mask of rows to drop for a missing image (policy 'skip'), or
  None (placeholder: train on zero images; error: verify() already raised)."""
  policy = d.hybrid.missing_image_policy
  if images_lib.is_h5(loc) or not (policy == "skip" or d.hybrid.verify_images.enabled):
    return None
  absent = images_lib.verify(loc, f["image_id"], d.hybrid.file_extension,
                             d.hybrid.verify_images, policy, split)
  missing[split] = [images_lib.to_str(x) for x in f["image_id"][absent]]
  return absent if policy == "skip" else None


def _file_tables(f: dict, labels: np.ndarray, rows: np.ndarray, d, components) -> list[RowTable]:
  """The tables of one file's surviving `rows`: [all of them] with two files; with one file,
  [train, val] by the original's seeded split, taken after filtering (rows in file order)."""
  if d.h5.train_labels_path:
    return [_table(f, labels, rows, components)]
  perm = np.random.RandomState(d.h5.train_val_split_seed).permutation(len(rows))
  n_train = int(len(rows) * d.h5.train_val_split_ratio)
  return [_table(f, labels, np.sort(rows[perm[:n_train]]), components),
          _table(f, labels, np.sort(rows[perm[n_train:]]), components)]


def _split_tables(files: list[dict], index: dict, image_paths: list[str], config, components,
                  dropped: dict, missing: dict) -> tuple[RowTable, RowTable]:
  """(train, val) tables of the filtered rows (val empty with a train file only). Counts the
  dropped rows in `dropped` and the missing images in `missing`; frees each file's raw columns
  (`files[i] = None`) once its tables are made."""
  d = config.data
  tasks = list(d.task_keys_h5)
  labels = [np.stack([index[t][i] for t in tasks], axis=1) for i in range(len(files))]
  tables = []
  for i, (f, loc) in enumerate(zip(files, image_paths)):
    split = ("train", "val")[i] if len(files) > 1 else "all"
    absent = _absent_images(f, loc, d, split, missing)
    rows = _filter(f, absent, config, components, dropped)
    tables += _file_tables(f, labels[i], rows, d, components)
    files[i] = labels[i] = None  # free the raw columns
  train = tables[0]
  return train, tables[1] if len(tables) > 1 else train.take(np.zeros(0, np.int64))


def _taxonomy(d, tasks: list[str], maps: dict, num: dict, train: RowTable, val: RowTable,
              partial: bool) -> taxonomy_lib.TaxonomyTree:
  """The tree of data.taxonomy.path (checked against the data), else the one the rows used
  link (`TaxonomyTree.from_labels`)."""
  if d.taxonomy.path:
    with open(d.taxonomy.path, encoding="utf-8") as fh:
      tree = taxonomy_lib.TaxonomyTree.from_json(fh.read())
    if tree.task_keys != tasks or tree.num_classes != num:
      raise DataError(f"{d.taxonomy.path}: tasks {tree.task_keys} / classes {tree.num_classes} "
                      f"do not match the data ({tasks} / {num})")
    return tree
  names = {t: {v: k for k, v in m.items()} for t, m in maps.items()}
  used = np.concatenate([train.labels, val.labels])  # links from the rows actually used
  try:
    return taxonomy_lib.TaxonomyTree.from_labels(used, tasks, num, null_class=partial,
                                                 resolve=d.taxonomy.multi_parent, names=names)
  except taxonomy_lib.TaxonomyError as e:
    raise DataError(f"Data schema check failed:\n  {e}") from e


def load(config) -> Dataset:
  """Builds the train and val row tables from config.data; raises DataError listing problems."""
  d = config.data
  tasks = list(d.task_keys_h5)
  components = config_lib.enabled_components(config)
  problems: list[str] = []
  label_paths, image_paths = _paths(d, problems)
  problems += _image_location_problems(image_paths)
  files = [_read(p, tasks, components, problems) for p in label_paths if p]
  problems += _image_id_problems(files, image_paths)
  if problems:
    raise DataError("Data schema check failed:\n  " + "\n  ".join(dict.fromkeys(problems)))

  partial = d.partial.levels
  rows_total = sum(f["n"] for f in files)
  nonfinite = _nonfinite_counts(files, components)
  maps, num, index = _class_maps(files, tasks, partial)
  dropped, missing = dict.fromkeys(FILTERS, 0), {}
  train, val = _split_tables(files, index, image_paths, config, components, dropped, missing)
  if len(train) == 0:
    raise DataError(f"Data schema check failed:\n  no training rows survive the filters "
                    f"(dropped: {dropped})")
  return Dataset(train=train, val=val, task_keys=tasks,
                 components=[(n, c.dim) for n, c in components], class_to_idx=maps,
                 num_classes=num, taxonomy=_taxonomy(d, tasks, maps, num, train, val, partial),
                 rows_total=rows_total, dropped=dropped, missing_images=missing,
                 train_images=image_paths[0], val_images=image_paths[-1],
                 nonfinite_meta=nonfinite, taxon_names=_taxon_names(label_paths[0], tasks))


def _taxon_names(labels_path: str, tasks: list[str]) -> dict[str, dict[str, str]]:
  """{task: {raw id: name}} from `taxa.json` beside the labels file (data/build.py writes it),
  or {} when there is none."""
  path = os.path.join(os.path.dirname(os.path.abspath(labels_path)), "taxa.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    taxa = json.load(f)
  return {t: {k: v["name"] for k, v in taxa[t].items() if isinstance(v, dict) and "name" in v}
          for t in tasks if isinstance(taxa.get(t), dict)}
