import os
import shutil

import numpy as np
import pytest

from linnaeus_jax.data import labels, pipeline
from linnaeus_jax.data import synthetic

from conftest import SMALL, tiny_config


@pytest.fixture(scope="module")
def data_and_config(small_dataset):
  c = tiny_config(small_dataset[0])
  return labels.load(c), c




def test_train_batches_cover_each_epoch_once(data_and_config):
  data, c = data_and_config
  spe = labels.steps_per_epoch(len(data.train), c.data.batch_size)
  fn = pipeline.TrainRecords(data.train, None, data.task_keys, c.data.batch_size,
                             c.data.batch_size, 0, seed=7)
  for epoch in range(2):
    rows = [fn.row(k) for k in range(epoch * spe * 16, (epoch + 1) * spe * 16)]
    assert len(set(rows)) == len(rows) == spe * c.data.batch_size
  epoch0 = [fn.row(k) for k in range(spe * 16)]
  epoch1 = [fn.row(k) for k in range(spe * 16, 2 * spe * 16)]
  assert epoch0 != epoch1  # reshuffled per epoch
  again = pipeline.TrainRecords(data.train, None, data.task_keys, 16, 16, 0, seed=7)
  assert [again.row(k) for k in range(spe * 16)] == epoch0  # a pure function of (seed, epoch)


def test_processes_read_disjoint_slices_of_the_global_batch(data_and_config):
  data, _ = data_and_config
  whole = pipeline.TrainRecords(data.train, None, data.task_keys, 16, 16, 0, seed=1)
  parts = [pipeline.TrainRecords(data.train, None, data.task_keys, 16, 4, p, seed=1)
           for p in range(4)]
  for b in range(3):
    glob = [whole.row(b * 16 + i) for i in range(16)]
    local = sum(([parts[p].row(b * 4 + i) for i in range(4)] for p in range(4)), [])
    assert local == glob


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
  # The first record is the first row of the (seed, epoch 0) permutation.
  row = pipeline.TrainRecords(data.train, None, data.task_keys, 16, 16, 0, c.misc.seed).row(0)
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


def test_images_h5_mode_gives_the_same_pixels_as_the_folder(tmp_path):
  import dataclasses
  opts = dataclasses.replace(SMALL, max_samples_per_species=4, min_samples_per_species=4)
  p_jpg = synthetic.generate(str(tmp_path / "jpg"), opts, verbose=False)
  p_h5 = synthetic.generate(str(tmp_path / "h5"), dataclasses.replace(opts, image_format="h5"),
                            verbose=False)
  r_h5 = pipeline.ImageReader(p_h5["images_path"], 32)
  import pickle
  r_h5 = pickle.loads(pickle.dumps(r_h5))  # picklable for Grain workers (no open handle)
  img_h5 = r_h5(3, "unused")
  img_jpg = pipeline.ImageReader(p_jpg["images_dir"], 32)(3, "100003_0.jpg")
  assert img_h5.shape == img_jpg.shape == (32, 32, 3)
  blocks = lambda x: x.astype(float).reshape(8, 4, 8, 4, 3).mean((1, 3))
  assert np.abs(blocks(img_h5) - blocks(img_jpg)).mean() < 4  # JPEG loss only
  assert r_h5._h5 is not None and pickle.loads(pickle.dumps(r_h5))._h5 is None


def test_missing_image_is_a_clear_error_or_a_zero_image(tmp_path, small_dataset):
  src = small_dataset[1]["images_dir"]
  name = sorted(os.listdir(src))[0]
  folder = tmp_path / "imgs"
  folder.mkdir()
  shutil.copy(os.path.join(src, name), folder / name)
  reader = pipeline.ImageReader(str(folder), 32)
  assert reader(0, name).shape == (32, 32, 3)
  assert reader(0, name[:-4]).shape == (32, 32, 3)  # extension appended only when missing
  with pytest.raises(FileNotFoundError, match="absent.jpg.*allow_missing_images"):
    reader(5, "absent")
  lenient = pipeline.ImageReader(str(folder), 32, allow_missing=True)
  assert not lenient(5, "absent").any()


def test_resize_squashes_with_area_interpolation():
  from linnaeus_jax import preprocessing
  img = np.zeros((4, 8, 3), np.uint8)
  img[:, 4:] = 200
  out = preprocessing.to_rgb_uint8(img, 2)
  np.testing.assert_array_equal(out[..., 0], [[0, 200], [0, 200]])  # box average of each half
  gray = preprocessing.to_rgb_uint8(np.full((3, 3), 7, np.uint8), 3)
  assert gray.shape == (3, 3, 3) and (gray == 7).all()


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
