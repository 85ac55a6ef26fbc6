"""Grain input pipelines over the row tables (docs/data.md#sampling-and-augmentation).

Training: the epoch order of `sampler.epoch_order` (a pure function of (seed, epoch)), each
process reading its slice of every global batch; per record, the image is read, decoded, resized
and (train only) augmented with a generator seeded by (seed, epoch, position). Validation: the
rows in order, the last batch padded with `example_mask=False`. Records are decoded in Grain's
reader threads, and in worker processes when `data.num_workers > 0` (`mp_prefetch`). Iterators
support get_state/set_state, which the checkpoint saves.

An image found unreadable while reading under `missing_image_policy=skip` (a corrupt file, when
`verify_images.decode` is off) drops its sample: the slot becomes a masked padding slot
(`example_mask` False, labels and metadata zero) and its mixing partner is unpaired, so batch
shapes, the order of every other sample and the iterator state stay as they were; each skip is
logged and counted (`SkipMask`).
"""

from __future__ import annotations

import logging

import grain
import numpy as np
from absl import flags

from linnaeus_jax import hardware
from linnaeus_jax.data import augment, images, labels as labels_lib, sampler


def _record(table: labels_lib.RowTable, reader, tasks, i: int, group: int = -1,
            pair_ok: bool = False):
  """One example; i < 0 gives a padding record (example_mask False), and so does a row whose
  image the reader skips (None), marked `skipped` (removed again by `SkipMask`)."""
  image = reader(int(table.raw_row[i]), table.image_id[i]) if i >= 0 else None
  if image is None:
    s = reader.img_size
    return {"image": np.zeros((s, s, 3), np.uint8),
            "labels": {t: np.int32(0) for t in tasks},
            "meta": {k: np.zeros(v.shape[1], np.float32) for k, v in table.meta.items()},
            "meta_valid": np.zeros(table.meta_valid.shape[1], bool),
            "group_id": np.int32(-1), "pair_ok": np.bool_(False),
            "example_mask": np.bool_(False), "skipped": np.bool_(i >= 0)}
  return {"image": image,
          "labels": {t: table.labels[i, j] for j, t in enumerate(tasks)},
          "meta": {k: v[i] for k, v in table.meta.items()},
          "meta_valid": table.meta_valid[i],
          "group_id": np.int32(group), "pair_ok": np.bool_(pair_ok),
          "example_mask": np.bool_(True), "skipped": np.bool_(False)}


class SkipMask:
  """Per local batch, in the main process: drops the `skipped` marker, unpairs the mixing partner
  (slot ^ 1) of a skipped slot, and counts and logs the skipped images of this run."""

  def __init__(self, split: str):
    self.split, self.count = split, 0

  def __call__(self, batch: dict) -> dict:
    skipped_B = batch.pop("skipped")
    if skipped_B.any():
      b = len(skipped_B)
      partner_B = np.minimum(np.arange(b) ^ 1, b - 1)
      batch["pair_ok"] = batch["pair_ok"] & ~skipped_B[partner_B]
      self.count += int(skipped_B.sum())
      logging.warning("%s: %d unreadable image(s) skipped in this batch, %d so far "
                      "(data.hybrid.missing_image_policy=skip)", self.split,
                      int(skipped_B.sum()), self.count)
    return batch


class TrainRecords:
  """Local element k of this process -> its training record (a picklable Grain map function)."""

  def __init__(self, table, reader, tasks, group, global_batch, local_batch, process_index,
               seed, policy="none"):
    self.table, self.reader, self.tasks, self.group = table, reader, tasks, group
    self.gb, self.lb, self.pid, self.seed, self.policy = (global_batch, local_batch,
                                                          process_index, seed, policy)
    self.per_epoch = steps_per_epoch(group, global_batch) * global_batch
    self._epoch, self._order = -1, None

  def position(self, k: int) -> tuple[int, int]:
    """(epoch, position in the epoch's global order) of local element k."""
    g = (k // self.lb) * self.gb + self.pid * self.lb + k % self.lb
    return divmod(g, self.per_epoch)

  def row(self, k: int) -> tuple[int, bool]:
    epoch, pos = self.position(k)
    if epoch != self._epoch:
      self._order = sampler.epoch_order(self.group, self.seed, epoch, self.gb)
      self._epoch = epoch
    rows, ok = self._order
    return int(rows[pos]), bool(ok[pos])

  def __call__(self, k: int):
    i, ok = self.row(k)
    rec = _record(self.table, self.reader, self.tasks, i, self.group[i] if i >= 0 else -1, ok)
    if rec["example_mask"] and self.policy != "none":
      rng = np.random.default_rng([self.seed, *self.position(k)])
      rec["image"] = augment.apply_policy(rec["image"], self.policy, rng)
    return rec


class EvalRecords:
  """Sequential order; this process's slice of each global batch; padding past the end."""

  def __init__(self, table, reader, tasks, global_batch, local_batch, process_index):
    self.table, self.reader, self.tasks = table, reader, tasks
    self.gb, self.lb, self.pid = global_batch, local_batch, process_index

  def __call__(self, k: int):
    g = (k // self.lb) * self.gb + self.pid * self.lb + k % self.lb
    return _record(self.table, self.reader, self.tasks, g if g < len(self.table) else -1)


def steps_per_epoch(group: np.ndarray, global_batch: int) -> int:
  """Global batches per epoch: every row once, odd leftovers and the last batch padded."""
  pairable = np.bincount(group[group >= 0]) // 2 if np.any(group >= 0) else np.zeros(1, int)
  singles = len(group) - 2 * int(pairable.sum())
  return -(-(len(group) + singles % 2) // global_batch)


def train_groups(data: labels_lib.Dataset, config) -> np.ndarray:
  if config.data.sampler.type == "grouped":
    return sampler.mix_groups(data.train.labels, data.task_keys, config)
  return np.full(len(data.train), -1, np.int32)


def _reader(config, location: str) -> images.ImageReader:
  h = config.data.hybrid
  return images.ImageReader(location, config.data.img_size, h.file_extension,
                            h.missing_image_policy)


def padding_record(data: labels_lib.Dataset, config) -> dict:
  """One training record of padding: the shapes and dtypes of a batch's rows, reading no image."""
  rec = _record(data.train, _reader(config, data.train_images), data.task_keys, -1)
  del rec["skipped"]  # removed by SkipMask
  return rec


def _finish(ds: grain.MapDataset, config, local_batch: int, split: str) -> grain.IterDataset:
  ds = ds.batch(local_batch, drop_remainder=True)  # whole batches, so workers keep the order
  workers, threads = hardware.data_workers(config.data.num_workers, config.data.prefetch_threads)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=2 * local_batch))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; library use has not parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it.map(SkipMask(split))  # one-to-one, after the workers: the state is the same


def train_dataset(data: labels_lib.Dataset, config, num_steps: int, process_index: int = 0,
                  process_count: int = 1, first_step: int = 0) -> grain.IterDataset:
  """This process's local batches of steps [first_step, num_steps); iterate with `iter()`,
  checkpoint its state."""
  gb = config.data.batch_size
  lb = gb // process_count
  fn = TrainRecords(data.train, _reader(config, data.train_images), data.task_keys,
                    train_groups(data, config), gb, lb, process_index, config.misc.seed,
                    config.aug.autoaug.policy)
  return _finish(grain.MapDataset.range(first_step * lb, num_steps * lb).map(fn), config, lb,
                 "train")


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
  return _finish(grain.MapDataset.range(n_batches * lb).map(fn), config, lb, "val")
