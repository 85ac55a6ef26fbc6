import dataclasses
import os
import pickle
import shutil

import ml_collections
import numpy as np
import pytest

from linnaeus_jax.data import images, synthetic

from conftest import SMALL


def _opts(**kw):
  base = dict(enabled=True, max_missing_ratio=1.0, max_missing_count=-1, num_workers=2,
              decode=False, report_path="")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_h5_mode_gives_the_same_pixels_as_the_folder(tmp_path):
  opts = dataclasses.replace(SMALL, max_samples_per_species=4, min_samples_per_species=4)
  p_jpg = synthetic.generate(str(tmp_path / "jpg"), opts, verbose=False)
  p_h5 = synthetic.generate(str(tmp_path / "h5"), dataclasses.replace(opts, image_format="h5"),
                            verbose=False)
  r_h5 = pickle.loads(pickle.dumps(images.ImageReader(p_h5["images_path"], 32)))
  img_h5 = r_h5(3, "unused")
  img_jpg = images.ImageReader(p_jpg["images_dir"], 32)(3, b"100003_0.jpg")
  assert img_h5.shape == img_jpg.shape == (32, 32, 3)
  blocks = lambda x: x.astype(float).reshape(8, 4, 8, 4, 3).mean((1, 3))
  assert np.abs(blocks(img_h5) - blocks(img_jpg)).mean() < 4  # JPEG loss only
  assert r_h5._handle is not None and pickle.loads(pickle.dumps(r_h5))._handle is None
  assert images.check_h5(p_h5["images_path"], 5)[0].endswith("but the labels file has 5")


def _folder(tmp_path, small_dataset, n=3):
  src = small_dataset[1]["images_dir"]
  names = sorted(os.listdir(src))[:n]
  folder = tmp_path / "imgs"
  folder.mkdir()
  for name in names:
    shutil.copy(os.path.join(src, name), folder / name)
  return str(folder), names


def test_extension_appended_only_when_missing(tmp_path, small_dataset):
  folder, names = _folder(tmp_path, small_dataset)
  reader = images.ImageReader(folder, 32, ".JPG")
  assert reader(0, names[0]).shape == (32, 32, 3)  # "x.jpg" ends with ".JPG" ignoring case
  assert images.file_path(folder, "abc", ".jpg").endswith("abc.jpg")
  assert images.file_path(folder, b"abc.JPG", ".jpg").endswith("abc.JPG")


def test_runtime_policies(tmp_path, small_dataset):
  folder, _ = _folder(tmp_path, small_dataset)
  with pytest.raises(images.MissingImagesError, match="absent.jpg.*missing_image_policy"):
    images.ImageReader(folder, 32)(5, "absent")
  assert not images.ImageReader(folder, 32, policy="placeholder")(5, "absent").any()
  (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(images.MissingImagesError, match="corrupt.jpg"):
    images.ImageReader(folder, 32)(6, "corrupt.jpg")


def test_verification_limits_and_decode(tmp_path, small_dataset):
  folder, names = _folder(tmp_path, small_dataset)
  (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"not a jpeg")
  ids = np.array(names + ["gone.jpg", "corrupt.jpg"], dtype=object)
  missing = images.verify(folder, ids, ".jpg", _opts(), "skip", "train")
  np.testing.assert_array_equal(missing, [False, False, False, True, False])
  missing = images.verify(folder, ids, ".jpg", _opts(decode=True), "skip", "train")
  np.testing.assert_array_equal(missing, [False, False, False, True, True])
  with pytest.raises(images.MissingImagesError, match="1 of 5 train images .*gone.jpg"):
    images.verify(folder, ids, ".jpg", _opts(), "error", "train")
  with pytest.raises(images.MissingImagesError, match="max_missing_count=0"):
    images.verify(folder, ids, ".jpg", _opts(max_missing_count=0), "skip", "train")
  with pytest.raises(images.MissingImagesError, match="max_missing_ratio=0.1"):
    images.verify(folder, ids, ".jpg", _opts(max_missing_ratio=0.1), "skip", "train")


def test_location_kinds(tmp_path, small_dataset):
  """A folder, one images.h5 of arrays, or shards: a glob, comma-separated paths or one shard."""
  from linnaeus_jax.data import shards
  folder, names = _folder(tmp_path, small_dataset)
  out = shards.pack([os.path.join(folder, n) for n in names], str(tmp_path / "s"), shard_size=2,
                    progress=False)
  arrays = str(tmp_path / "arrays.h5")
  synthetic_h5 = synthetic.generate(
      str(tmp_path / "h5"), dataclasses.replace(SMALL, max_samples_per_species=1,
                                                min_samples_per_species=1, image_format="h5"),
      verbose=False)["images_path"]
  os.replace(synthetic_h5, arrays)
  kinds = {folder: "folder", arrays: "h5", str(tmp_path / "s" / "images-*.h5"): "shards",
           ",".join(out): "shards", f" {out[0]} , {out[1]}": "shards", out[1]: "shards",
           str(tmp_path / "absent.h5"): "h5"}
  for location, kind in kinds.items():
    assert images.kind(location) == kind, location
  assert not images.is_h5(f"{out[0]},{folder}")  # a folder among files: not HDF5
  for location in (str(tmp_path / "s" / "images-*.h5"), f" {out[0]} , {out[1]}"):
    reader = images.ImageReader(location, 32)
    for row, name in enumerate(names):
      np.testing.assert_array_equal(reader(row, "unused"),
                                    images.ImageReader(folder, 32)(row, name))


def test_unreadable_images_are_warned_about_once_then_counted(tmp_path, small_dataset, caplog,
                                                              monkeypatch):
  """Under `placeholder` each unreadable image read every epoch warns once, naming it;
  `unreadable_images` lists them with their reasons; `reset_unreadable` forgets them."""
  monkeypatch.setattr(images, "_UNREADABLE", {})  # this process's record, fresh for the test
  folder, names = _folder(tmp_path, small_dataset)
  (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"not a jpeg")
  reader = images.ImageReader(folder, 32, policy="placeholder")
  with caplog.at_level("WARNING"):
    for _ in range(3):  # three epochs
      assert not reader(5, "corrupt.jpg").any()
      assert not reader(6, "absent").any()
      assert reader(0, names[0]).any()  # readable images are not noted
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  corrupt, absent = os.path.join(folder, "corrupt.jpg"), os.path.join(folder, "absent.jpg")
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith(f"image {corrupt} unreadable (")
  assert warnings[1].startswith(f"image {absent} unreadable (")
  assert all("using a zero image. Warned once" in w for w in warnings)
  bad = images.unreadable_images()
  assert list(bad) == [corrupt, absent]
  assert "No such file or directory" in bad[absent] and "cannot identify" in bad[corrupt], bad
  bad.clear()  # a copy: the record is unchanged
  assert len(images.unreadable_images()) == 2
  caplog.clear()
  with caplog.at_level("WARNING"):  # `skip` adds to the same record
    assert images.ImageReader(folder, 32, policy="skip")(7, "gone") is None
    assert images.ImageReader(folder, 32, policy="skip")(7, "gone") is None
  assert len(caplog.records) == 1 and "skipped" in caplog.records[0].getMessage()
  assert list(images.unreadable_images()) == [corrupt, absent, os.path.join(folder, "gone.jpg")]
  images.reset_unreadable()
  assert images.unreadable_images() == {}
