"""Hostile data: NaN/inf metadata, odd image modes, impossible taxon ids, identifiers escaping the
images folder, corrupt images under missing_image_policy=skip. Each table is a list of cases; add
a row to cover a new input."""

import dataclasses
import io
import logging
import os
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from linnaeus_jax import config as config_lib, preprocessing
from linnaeus_jax.data import images, labels, pipeline, synthetic
from linnaeus_jax.tools import inspect_dataset

from conftest import SMALL, tiny_config

N = 4  # rows of the hand-made labels files


def _columns(**changes) -> dict:
  """The columns of a clean 4-row labels file (every component valid on every row), changed."""
  cols = {"img_identifiers": np.array([f"{i}.jpg" for i in range(N)], dtype=object),
          "taxa_L10": np.array([1, 2, 3, 4], np.int64),
          "taxa_L20": np.array([9, 9, 8, 8], np.int64),
          "temporal": np.tile([0.5, 0.5], (N, 1)).astype(np.float32),
          "spatial": np.tile([0.0, 0.6, 0.8], (N, 1)).astype(np.float32),
          "elevation_broadrange_2": np.tile(np.full(10, 0.3), (N, 1)).astype(np.float32),
          "raw_lat": np.full(N, 10.0, np.float32), "raw_lon": np.full(N, 20.0, np.float32),
          "raw_elevation": np.full(N, 5.0, np.float32),
          "raw_date_observed": np.array(["2020-05-01"] * N, dtype=object)}
  for k, v in changes.items():
    if v is None:
      del cols[k]
    else:
      cols[k] = v(cols[k].copy()) if callable(v) else v
  return cols


def _write(path, cols: dict) -> str:
  with h5py.File(path, "w") as h5:
    for k, v in cols.items():
      if v.dtype == object:
        h5.create_dataset(k, data=v, dtype=h5py.string_dtype())
      else:
        h5.create_dataset(k, data=v)
  return str(path)


def _config(path: str):
  c = config_lib.base_config()
  c.data.h5.labels_path = path
  c.data.hybrid.use_hybrid = True
  c.data.hybrid.images_dir = os.path.dirname(path)  # exists; no image is read
  c.data.task_keys_h5 = ["taxa_L10", "taxa_L20"]
  c.data.partial.levels = True
  c.data.meta.components.ELEVATION.enabled = True
  c.data.h5.train_val_split_ratio = 1.0
  return c


def _load(tmp_path, **changes) -> labels.Dataset:
  return labels.load(_config(_write(tmp_path / "labels.h5", _columns(**changes))))


def _set(row: int, value, col=slice(None)):
  """A column change: `value` written into `row` (all of its columns, or column `col`)."""
  def change(a):
    a[(row, col) if a.ndim > 1 else row] = value
    return a
  return change


# --------------------------------------------------------------- 1. NaN / inf in encoded metadata

# (case, column changes, component made invalid on row 2). The raw or explicit validity columns
# all say "valid"; the encoded values say otherwise.
NONFINITE_CASES = [
    ("temporal NaN, raw date present", {"temporal": _set(2, np.nan, 0)}, "TEMPORAL"),
    ("spatial inf, raw lat/lon present", {"spatial": _set(2, np.inf)}, "SPATIAL"),
    ("elevation -inf, raw elevation present",
     {"elevation_broadrange_2": _set(2, -np.inf, 3)}, "ELEVATION"),
    ("spatial NaN, spatial_valid says 1",
     {"spatial": _set(2, np.nan, 1), "spatial_valid": np.ones(N, np.uint8)}, "SPATIAL"),
    ("temporal NaN, validity from values (no raw column)",
     {"temporal": _set(2, np.nan, 1), "raw_date_observed": None}, "TEMPORAL"),
]


@pytest.mark.parametrize("case,changes,component", NONFINITE_CASES,
                         ids=[c[0] for c in NONFINITE_CASES])
def test_nonfinite_metadata_is_invalid_zeroed_and_counted(tmp_path, caplog, case, changes,
                                                          component):
  with caplog.at_level(logging.WARNING):
    d = _load(tmp_path, **changes)
  t = d.train.take(np.argsort(d.train.raw_row))
  names = [n for n, _ in d.components]
  expected_valid = np.ones((N, len(names)), bool)
  expected_valid[2, names.index(component)] = False
  np.testing.assert_array_equal(t.meta_valid, expected_valid)
  for name in names:
    assert np.isfinite(t.meta[name]).all(), name  # the model never sees NaN or inf
  assert not t.meta[component][2].any()  # zeroed, like every invalid component
  assert d.nonfinite_meta == {n: int(n == component) for n in names}
  summary = inspect_dataset.summary(d, partial=True)
  assert summary["meta_nonfinite_rows"] == {n: int(n == component) for n in names}
  assert f"{component}: 1" in caplog.text and "NaN or inf" in caplog.text


def test_nonfinite_metadata_rows_can_be_filtered_as_missing(tmp_path):
  """allow_missing=False drops a row whose component is NaN, as any missing component."""
  c = _config(_write(tmp_path / "labels.h5", _columns(spatial=_set(1, np.nan))))
  c.data.meta.components.SPATIAL.allow_missing = False
  d = labels.load(c)
  assert d.dropped["missing_meta"] == 1 and sorted(d.train.raw_row) == [0, 2, 3]


# ------------------------------------------------------- 3. and 4. impossible ids, escaping paths

# (case, column changes, regexes the one DataError must match: task or file, rows, count)
SCHEMA_CASES = [
    ("negative species id", {"taxa_L10": _set(1, -5)},
     [r"taxa_L10 has 1 negative taxon ids .*rows 1 \(-5\)"]),
    ("negative ids in two tasks", {"taxa_L10": _set(3, -1), "taxa_L20": lambda a: -a},
     [r"taxa_L10 has 1 negative taxon ids .*rows 3 \(-1\)",
      r"taxa_L20 has 4 negative taxon ids .*rows 0 \(-9\), 1 \(-9\), 2 \(-8\), 3 \(-8\)"]),
    ("identifier climbing out with ..", {"img_identifiers": _set(2, "../outside.jpg")},
     [r"1 image identifiers resolve outside the images folder .*rows 2 \('../outside.jpg'\)"]),
    ("identifier climbing out after a subfolder", {"img_identifiers": _set(0, "a/../../x.jpg")},
     [r"rows 0 \('a/../../x.jpg'\)"]),
    ("absolute identifier", {"img_identifiers": _set(3, "/etc/passwd")},
     [r"resolve outside the images folder .*rows 3 \('/etc/passwd'\)"]),
    ("every problem at once",
     {"taxa_L10": _set(0, -2), "img_identifiers": _set(1, "/abs.jpg"), "spatial": None},
     [r"taxa_L10 has 1 negative taxon ids .*rows 0 \(-2\)",
      r"rows 1 \('/abs.jpg'\)", r"missing source dataset 'spatial'"]),
]


@pytest.mark.parametrize("case,changes,patterns", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_impossible_ids_and_escaping_identifiers_are_schema_errors(tmp_path, case, changes,
                                                                   patterns):
  with pytest.raises(labels.DataError) as e:
    _load(tmp_path, **changes)
  assert isinstance(e.value, ValueError)  # the command line prints it as one `error:` line
  for pattern in patterns:
    assert any(re.search(pattern, line) for line in str(e.value).splitlines()), str(e.value)


def test_harmless_dots_in_identifiers_are_accepted(tmp_path):
  ids = np.array(["a..b.jpg", "sub/../0.jpg", "...jpg", "sub/x.jpg"], dtype=object)
  assert not images.outside_folder(ids).any()
  assert len(_load(tmp_path, img_identifiers=ids).train) == N


def test_file_path_refuses_escaping_identifiers(tmp_path):
  for name in ("../x.jpg", b"/etc/passwd", "a/../../x"):
    with pytest.raises(ValueError, match="resolves outside the images folder"):
      images.file_path(str(tmp_path), name, ".jpg")


# ------------------------------------------------------------------- 2. images in any PIL mode

def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def _tiff(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="TIFF")
  return buf.getvalue()


def _palette(transparency) -> bytes:
  """A 2x2 palette PNG: red, green, blue, (10, 20, 30), with `transparency` (an index or
  per-entry alpha bytes)."""
  img = Image.new("P", (2, 2))
  img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
  img.putdata([0, 1, 2, 3])
  img.info["transparency"] = transparency
  return _png(img)


def _grey(*values):
  """Expected 2x2 RGB of grey levels."""
  return np.repeat(np.array(values, np.uint8).reshape(2, 2, 1), 3, axis=-1)


def _la() -> Image.Image:
  a = np.stack([np.array([[10, 20], [30, 40]]), np.array([[0, 255], [128, 0]])], -1)
  return Image.fromarray(a.astype(np.uint8))  # HxWx2: mode LA


PALETTE_RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)
RGBA = np.array([[[200, 10, 20, 0], [30, 40, 50, 255]], [[1, 2, 3, 128], [4, 5, 6, 0]]], np.uint8)

# (case, encoded file bytes, expected 2x2 RGB). 16 bits: round(v / 257); floats: 0-255 scale,
# rounded and clipped; alpha dropped (the stored colour is kept).
MODE_CASES = [
    ("16-bit grey PNG (I;16)",
     _png(Image.fromarray(np.array([[0, 257], [32768, 65535]], np.uint16))), _grey(0, 1, 128, 255)),
    ("32-bit integer TIFF (I), clipped to 16 bits",
     _tiff(Image.fromarray(np.array([[0, 257], [32768, 70000]], np.int32))), _grey(0, 1, 128, 255)),
    ("float TIFF (F)",
     _tiff(Image.fromarray(np.array([[-5.0, 1.4], [127.6, 300.0]], np.float32))),
     _grey(0, 1, 128, 255)),
    ("grey + alpha PNG (LA)", _png(_la()), _grey(10, 20, 30, 40)),
    ("palette PNG with a transparent colour (P)", _palette(1), PALETTE_RGB),
    ("palette PNG with per-entry alpha (P)", _palette(bytes([255, 0, 128, 255])), PALETTE_RGB),
    ("RGBA PNG", _png(Image.fromarray(RGBA)), RGBA[..., :3]),
    ("bilevel PNG (1)", _png(Image.fromarray(np.array([[0, 1], [1, 0]], bool))),
     _grey(0, 255, 255, 0)),
]


@pytest.mark.filterwarnings("error")  # no Pillow warning either
@pytest.mark.parametrize("case,data,expected", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_image_modes_decode_to_the_right_rgb(tmp_path, case, data, expected):
  """The same values from a file (training's reader), bytes and a PIL image (inference)."""
  (tmp_path / "img.png").write_bytes(data)
  from_reader = images.ImageReader(str(tmp_path), 2, ".png")(0, "img")
  np.testing.assert_array_equal(from_reader, expected)
  np.testing.assert_array_equal(preprocessing.to_rgb_uint8(data, 2), expected)
  with Image.open(io.BytesIO(data)) as img:
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(img, 2), expected)


# (case, array, expected 2x2 RGB): arrays follow the same rules as the modes.
ARRAY_CASES = [
    ("uint16 grey", np.array([[0, 257], [32768, 65535]], np.uint16), _grey(0, 1, 128, 255)),
    ("float grey, HxWx1", np.array([[[-1.0], [1.4]], [[127.6], [np.nan]]]), _grey(0, 1, 128, 0)),
    ("grey + alpha, HxWx2", np.asarray(_la()), _grey(10, 20, 30, 40)),
    ("RGBA, HxWx4", RGBA, RGBA[..., :3]),
]


@pytest.mark.parametrize("case,array,expected", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_image_arrays_decode_to_the_right_rgb(case, array, expected):
  np.testing.assert_array_equal(preprocessing.to_rgb_uint8(array, 2), expected)


# ------------------------------------------- 5. corrupt image under skip, without decode checks

def test_corrupt_image_is_skipped_while_training_under_policy_skip(tmp_path, caplog):
  opts = dataclasses.replace(SMALL, max_samples_per_species=6, min_samples_per_species=6)
  synthetic.generate(str(tmp_path), opts, verbose=False)
  c = tiny_config(str(tmp_path))
  c.data.hybrid.missing_image_policy = "skip"
  c.data.hybrid.verify_images.decode = False
  c.data.sampler.type = "standard"
  data = labels.load(c)
  bad = 5  # a training row; its file exists (verification passes) but is not an image
  bad_name = images.to_str(data.train.image_id[bad])
  (tmp_path / "images" / bad_name).write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
  assert data.dropped["missing_image"] == 0
  lb = c.data.batch_size
  steps = pipeline.steps_per_epoch(pipeline.train_groups(data, c), lb)
  order = pipeline.TrainRecords(data.train, None, data.task_keys, pipeline.train_groups(data, c),
                                lb, lb, 0, c.misc.seed)
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.train_dataset(data, c, num_steps=steps))
  assert len(batches) == steps  # every batch still comes, full size
  rows = np.array([order.row(k)[0] for k in range(steps * lb)]).reshape(steps, lb)
  mask = np.stack([b["example_mask"] for b in batches])
  np.testing.assert_array_equal(mask, (rows >= 0) & (rows != bad))  # only that row is gone
  assert mask.sum() == len(data.train) - 1
  b, j = np.argwhere(rows == bad)[0]
  assert not batches[b]["image"][j].any() and not batches[b]["meta_valid"][j].any()
  assert "skipped" not in batches[0]  # the marker does not reach the model
  assert bad_name in caplog.text and "1 so far" in caplog.text
  # Resumable: the iterator state restores to the same batches, the skipped slot included.
  it = iter(pipeline.train_dataset(data, c, num_steps=steps))
  for _ in range(b):
    next(it)
  state = it.get_state()
  it2 = iter(pipeline.train_dataset(data, c, num_steps=steps))
  it2.set_state(state)
  for want in batches[b:]:
    got = next(it2)
    np.testing.assert_array_equal(got["example_mask"], want["example_mask"])
    np.testing.assert_array_equal(got["labels"]["taxa_L10"], want["labels"]["taxa_L10"])


def test_skipped_slot_unpairs_its_mixing_partner():
  batch = {"skipped": np.array([False, True, False, False, True]),
           "pair_ok": np.array([True, False, True, True, False])}
  out = pipeline.SkipMask("train")(batch)
  assert "skipped" not in out
  np.testing.assert_array_equal(out["pair_ok"], [False, False, True, True, False])
