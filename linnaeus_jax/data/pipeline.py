"""Grain input pipelines over the row tables (reference/data.md §8).

The global batch order is a pure function of (seed, epoch): each epoch is a seeded permutation of
the training rows cut into global batches; each process reads its own slice of every global
batch. Records are decoded in Grain's reader threads (and worker processes when
`data.num_workers > 0`); `images.h5` is opened lazily in each process, never pickled.
"""

from __future__ import annotations

import os

import grain
from absl import flags
import h5py
import numpy as np

from linnaeus_jax import preprocessing
from linnaeus_jax.data import labels as labels_lib


class ImageReader:
  """Reads one image by (raw row, identifier) from a folder or an `images.h5` file."""

  def __init__(self, location: str, img_size: int, file_extension: str = ".jpg",
               allow_missing: bool = False):
    self.location, self.img_size = location, img_size
    self.ext, self.allow_missing = file_extension, allow_missing
    self.is_h5 = location.endswith((".h5", ".hdf5"))
    self._h5, self._pid = None, None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_h5"], state["_pid"] = None, None  # h5py handles cannot be pickled or forked
    return state

  def path(self, image_id: str) -> str:
    name = image_id if image_id.lower().endswith(self.ext.lower()) else image_id + self.ext
    return os.path.join(self.location, name)

  def __call__(self, raw_row: int, image_id: str) -> np.ndarray:
    if self.is_h5:
      if self._h5 is None or self._pid != os.getpid():
        self._h5, self._pid = h5py.File(self.location, "r", locking=False), os.getpid()
      return preprocessing.to_rgb_uint8(self._h5["images"][raw_row], self.img_size)
    path = self.path(image_id)
    try:
      return preprocessing.to_rgb_uint8(path, self.img_size)
    except (FileNotFoundError, OSError) as e:
      if self.allow_missing:
        return np.zeros((self.img_size, self.img_size, 3), np.uint8)
      raise FileNotFoundError(f"image {path!r} (row {raw_row}) cannot be read: {e}. Set "
                              "data.hybrid.allow_missing_images=True to train on a zero "
                              "image instead.") from e


def _record(table: labels_lib.RowTable, reader: ImageReader, tasks, i: int, valid: bool = True):
  if not valid:  # padding of the last evaluation batch
    s = reader.img_size
    return {"image": np.zeros((s, s, 3), np.uint8),
            "labels": {t: np.int32(0) for t in tasks},
            "meta": {k: np.zeros(v.shape[1], np.float32) for k, v in table.meta.items()},
            "meta_valid": np.zeros(table.meta_valid.shape[1], bool),
            "example_mask": np.bool_(False)}
  return {"image": reader(int(table.raw_row[i]), table.image_id[i]),
          "labels": {t: table.labels[i, j] for j, t in enumerate(tasks)},
          "meta": {k: v[i] for k, v in table.meta.items()},
          "meta_valid": table.meta_valid[i],
          "example_mask": np.bool_(True)}


class TrainRecords:
  """Local element k of this process -> the record of its row in the (seed, epoch) order."""

  def __init__(self, table, reader, tasks, global_batch, local_batch, process_index, seed):
    self.table, self.reader, self.tasks = table, reader, tasks
    self.gb, self.lb, self.pid, self.seed = global_batch, local_batch, process_index, seed
    self.per_epoch = labels_lib.steps_per_epoch(len(table), global_batch) * global_batch
    self._epoch, self._perm = -1, None

  def row(self, k: int) -> int:
    g = (k // self.lb) * self.gb + self.pid * self.lb + k % self.lb  # global element
    epoch, pos = divmod(g, self.per_epoch)
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.table))
      self._epoch = epoch
    return int(self._perm[pos])

  def __call__(self, k: int):
    return _record(self.table, self.reader, self.tasks, self.row(k))


class EvalRecords:
  """Sequential order; this process's slice of each global batch; padding past the end."""

  def __init__(self, table, reader, tasks, global_batch, local_batch, process_index):
    self.table, self.reader, self.tasks = table, reader, tasks
    self.gb, self.lb, self.pid = global_batch, local_batch, process_index

  def __call__(self, k: int):
    g = (k // self.lb) * self.gb + self.pid * self.lb + k % self.lb
    return _record(self.table, self.reader, self.tasks, min(g, len(self.table) - 1),
                   valid=g < len(self.table))


def _reader(config, location: str) -> ImageReader:
  h = config.data.hybrid
  return ImageReader(location, config.data.img_size, h.file_extension, h.allow_missing_images)


def _finish(ds: grain.MapDataset, config, local_batch: int) -> grain.IterDataset:
  ds = ds.batch(local_batch, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.data.prefetch_threads),
                                            prefetch_buffer_size=2 * local_batch))
  if config.data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; library use has not parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it


def train_dataset(data: labels_lib.Dataset, config, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """`num_steps` local batches of this process; iterate with `iter()`, checkpoint its state."""
  gb = config.data.batch_size
  lb = gb // process_count
  fn = TrainRecords(data.train, _reader(config, data.train_images), data.task_keys, gb, lb,
                    process_index, config.misc.seed)
  return _finish(grain.MapDataset.range(num_steps * lb).map(fn), config, lb)


def eval_dataset(data: labels_lib.Dataset, config, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset | None:
  """The whole validation split once, last batch padded (`example_mask` False)."""
  if len(data.val) == 0:
    return None
  gb = config.data.batch_size_val if config.data.batch_size_val > 0 else config.data.batch_size
  lb = gb // process_count
  n_batches = -(-len(data.val) // gb)
  fn = EvalRecords(data.val, _reader(config, data.val_images), data.task_keys, gb, lb,
                   process_index)
  return _finish(grain.MapDataset.range(n_batches * lb).map(fn), config, lb)
