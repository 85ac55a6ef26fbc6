import numpy as np
import pytest

from linnaeus_jax.data import labels, pipeline
from linnaeus_jax.data import synthetic

from conftest import SMALL, tiny_config


@pytest.fixture(scope="module")
def data_and_config(small_dataset):
  c = tiny_config(small_dataset[0])
  return labels.load(c), c




def _records(data, c, local=None, pid=0, seed=7):
  group = pipeline.train_groups(data, c)
  return pipeline.TrainRecords(data.train, None, data.task_keys, group, c.data.batch_size,
                               local or c.data.batch_size, pid, seed)


def test_train_order_covers_each_epoch_once(data_and_config):
  data, c = data_and_config
  fn = _records(data, c)
  per_epoch = fn.per_epoch
  epochs = [[fn.row(k)[0] for k in range(e * per_epoch, (e + 1) * per_epoch)] for e in range(2)]
  for rows in epochs:
    real = [r for r in rows if r >= 0]
    assert sorted(real) == list(range(len(data.train)))  # every row exactly once
    assert len(rows) - len(real) < c.data.batch_size + 1  # padding only to fill the last batch
  assert epochs[0] != epochs[1]  # reshuffled per epoch
  assert [_records(data, c).row(k)[0] for k in range(per_epoch)] == epochs[0]  # deterministic


def test_processes_read_disjoint_slices_of_the_global_batch(data_and_config):
  data, c = data_and_config
  whole = _records(data, c, seed=1)
  parts = [_records(data, c, local=4, pid=p, seed=1) for p in range(4)]
  for b in range(3):
    glob = [whole.row(b * 16 + i) for i in range(16)]
    local = sum(([parts[p].row(b * 4 + i) for i in range(4)] for p in range(4)), [])
    assert local == glob


def _process_epoch(config, process_index, process_count):
  """In its own OS process: one epoch of this process's local batches, as (image digest,
  example_mask, group_id, pair_ok) per slot."""
  import hashlib
  data = labels.load(config)
  steps = pipeline.steps_per_epoch(pipeline.train_groups(data, config), config.data.batch_size)
  out = []
  for b in pipeline.train_dataset(data, config, steps, process_index, process_count):
    out.append([(hashlib.sha1(im.tobytes()).hexdigest(), bool(m), int(g), bool(ok)) for im, m, g, ok
                in zip(b["image"], b["example_mask"], b["group_id"], b["pair_ok"])])
  return out


@pytest.mark.slow  # real processes
@pytest.mark.parametrize("n", [2, 4])
def test_every_row_once_per_epoch_across_processes(data_and_config, n):
  """N real processes each read their slice of an epoch; by image, every train row is seen
  exactly once in all, the padding fills only the last global batch, and partners (slot ^ 1)
  stay in the same process and group."""
  import concurrent.futures, hashlib, multiprocessing
  data, c = data_and_config
  reader = pipeline._reader(c, data.train_images)
  digest = [hashlib.sha1(reader(int(r), i).tobytes()).hexdigest()
            for r, i in zip(data.train.raw_row, data.train.image_id)]
  assert len(set(digest)) == len(digest)  # images identify rows
  row_of = {d: r for r, d in enumerate(digest)}
  with concurrent.futures.ProcessPoolExecutor(n, multiprocessing.get_context("spawn")) as pool:
    per_process = list(pool.map(_process_epoch, [c] * n, range(n), [n] * n))
  steps = pipeline.steps_per_epoch(pipeline.train_groups(data, c), c.data.batch_size)
  assert [len(p) for p in per_process] == [steps] * n
  seen, padding_steps = [], set()
  for batches in per_process:
    for step, slots in enumerate(batches):
      assert len(slots) == c.data.batch_size // n
      for k, (d, real, group, ok) in enumerate(slots):
        if real:
          seen.append(row_of[d])
        else:
          padding_steps.add(step)
        if ok:  # the partner is in this process's batch, a real row of the same group
          assert slots[k ^ 1][1] and slots[k ^ 1][2] == group
  assert sorted(seen) == list(range(len(data.train)))
  assert padding_steps <= {steps - 1}
  assert sum(ok for b in per_process for s in b for *_, ok in s) > len(data.train) // 2


def test_batch_contents(data_and_config):
  data, c = data_and_config
  it = iter(pipeline.train_dataset(data, c, num_steps=3))
  batch = next(it)
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert set(batch["labels"]) == set(data.task_keys)
  assert batch["labels"]["taxa_L10"].dtype == np.int32
  assert batch["meta"]["SPATIAL"].shape == (16, 3)
  assert batch["meta"]["ELEVATION"].shape == (16, 10)
  assert batch["meta_valid"].shape == (16, 3) and batch["meta_valid"].dtype == bool
  assert batch["example_mask"].all()
  assert batch["group_id"].shape == (16,) and batch["pair_ok"].dtype == bool
  # The first record is the first row of the (seed, epoch 0) permutation.
  row = _records(data, c, seed=c.misc.seed).row(0)[0]
  np.testing.assert_array_equal(batch["labels"]["taxa_L10"][0], data.train.labels[row, 0])
  np.testing.assert_array_equal(batch["meta"]["SPATIAL"][0], data.train.meta["SPATIAL"][row])
  assert len(list(it)) == 2  # exactly num_steps batches


def test_iterator_state_resumes_at_the_next_batch(data_and_config):
  data, c = data_and_config
  it = iter(pipeline.train_dataset(data, c, num_steps=6))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it)["labels"]["taxa_L10"] for _ in range(2)]
  it2 = iter(pipeline.train_dataset(data, c, num_steps=6))
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["labels"]["taxa_L10"], e)


def test_a_dataset_from_a_later_step_gives_that_steps_batches(data_and_config):
  """What a resume on another process count uses instead of the saved iterator state."""
  data, c = data_and_config
  whole = [b["labels"]["taxa_L10"] for b in pipeline.train_dataset(data, c, num_steps=6)]
  later = [b["labels"]["taxa_L10"] for b in pipeline.train_dataset(data, c, 6, first_step=4)]
  assert len(later) == 2
  for a, b in zip(whole[4:], later):
    np.testing.assert_array_equal(a, b)


def test_eval_covers_every_row_once_with_padding(data_and_config):
  data, c = data_and_config
  c = c.copy_and_resolve_references()
  c.data.batch_size_val = 32
  batches = list(pipeline.eval_dataset(data, c))
  mask = np.concatenate([b["example_mask"] for b in batches])
  assert mask.sum() == len(data.val) and len(mask) == 32 * len(batches)
  assert not mask[len(data.val):].any()
  labels_seen = np.concatenate([b["labels"]["taxa_L10"] for b in batches])[mask]
  np.testing.assert_array_equal(labels_seen, data.val.labels[:, 0])


def test_worker_processes_give_the_same_batches(tmp_path):
  """mp_prefetch pickles the source into spawned workers: images.h5 must open lazily there."""
  import dataclasses
  opts = dataclasses.replace(SMALL, max_samples_per_species=6, min_samples_per_species=6,
                             image_format="h5")
  paths = synthetic.generate(str(tmp_path), opts, verbose=False)
  c = tiny_config(str(tmp_path))
  c.data.hybrid.use_hybrid = False
  c.data.h5.images_path = paths["images_path"]
  data = labels.load(c)
  inline = list(pipeline.train_dataset(data, c, num_steps=4))
  c.data.num_workers = 2
  workers = list(pipeline.train_dataset(data, c, num_steps=4))
  assert len(workers) == 4
  for a, b in zip(inline, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"]["taxa_L10"], b["labels"]["taxa_L10"])


def _shard_config(small_dataset, tmp_path, shard_size=100):
  """tiny_config reading the small dataset's images from shards packed in labels.h5 row order."""
  import h5py
  from linnaeus_jax.data import images, shards
  out, paths = small_dataset
  with h5py.File(paths["labels_path"], "r") as h5:
    ids = h5["img_identifiers"][:]
  files = [images.file_path(paths["images_dir"], i, ".jpg") for i in ids]
  assert len(shards.pack(files, str(tmp_path), shard_size=shard_size, progress=False)) > 2
  c = tiny_config(out)
  c.data.hybrid.use_hybrid = False
  c.data.h5.images_path = str(tmp_path / "images-*.h5")
  return c


def _assert_same_batches(a, b, where="batch"):
  """Equal lists of batches: the same keys, nested dicts included, and equal arrays."""
  if isinstance(a, (list, dict)):
    assert type(a) is type(b) and len(a) == len(b), where
    keys = a.keys() if isinstance(a, dict) else range(len(a))
    assert set(keys) == set(b.keys() if isinstance(b, dict) else range(len(b))), where
    for k in keys:
      _assert_same_batches(a[k], b[k], f"{where}[{k!r}]")
  else:
    np.testing.assert_array_equal(a, b, err_msg=where)


def test_shards_give_the_same_batches_as_the_folder(small_dataset, tmp_path):
  c_folder = tiny_config(small_dataset[0])
  c_shards = _shard_config(small_dataset, tmp_path)
  for c in (c_folder, c_shards):
    c.aug.autoaug.policy = "original"  # augmentation included: same pixels in, same out
  d_folder, d_shards = labels.load(c_folder), labels.load(c_shards)
  np.testing.assert_array_equal(d_folder.train.raw_row, d_shards.train.raw_row)
  from_folder = list(pipeline.train_dataset(d_folder, c_folder, num_steps=3))
  from_shards = list(pipeline.train_dataset(d_shards, c_shards, num_steps=3))
  assert len(from_shards) == 3 and from_shards[0]["example_mask"].all()
  assert from_shards[0]["image"].std() > 10  # real images, not zeros
  _assert_same_batches(from_folder, from_shards)
  _assert_same_batches(list(pipeline.eval_dataset(d_folder, c_folder))[:2],
                       list(pipeline.eval_dataset(d_shards, c_shards))[:2])


def test_shards_in_worker_processes(small_dataset, tmp_path):
  """Spawned workers get the reader pickled without handles and open the shards themselves."""
  c = _shard_config(small_dataset, tmp_path)
  data = labels.load(c)
  inline = list(pipeline.train_dataset(data, c, num_steps=2))
  c.data.num_workers = 2
  _assert_same_batches(inline, list(pipeline.train_dataset(data, c, num_steps=2)))
