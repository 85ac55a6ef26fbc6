import datetime as dt
import json
import os

import numpy as np
from PIL import Image

from linnaeus_jax import preprocessing
from linnaeus_jax.data import encoders

from conftest import tiny_config

LAYOUT = [
    {"name": "TEMPORAL", "dim": 4, "encoder": "cyclic_date",
     "columns": ["month_sin", "month_cos", "hour_sin", "hour_cos"]},
    {"name": "SPATIAL", "dim": 3, "encoder": "unit_sphere",
     "columns": ["spatial_x", "spatial_y", "spatial_z"]},
    {"name": "ELEVATION", "dim": 4, "encoder": "elevation", "scales": [100.0, 1000.0],
     "columns": ["elev_100_sin", "elev_100_cos", "elev_1000_sin", "elev_1000_cos"]},
]


def test_request_metadata_is_encoded_with_the_training_formulas():
  meta, valid, warnings = preprocessing.encode_metadata(
      LAYOUT, {"lat": 30.0, "lon": -60.0, "datetime_utc": "2021-03-10T18:30:00+02:00",
               "elevation_m": 250.0})
  assert valid.tolist() == [True, True, True] and warnings == []
  # 18:30 at +02:00 is 16:30 UTC; month 3.
  np.testing.assert_allclose(meta["TEMPORAL"], encoders.temporal(month=3, hour=16), atol=1e-6)
  np.testing.assert_allclose(meta["SPATIAL"], [np.cos(np.pi / 6) * np.cos(-np.pi / 3),
                                               np.cos(np.pi / 6) * np.sin(-np.pi / 3), 0.5],
                             atol=1e-6)
  np.testing.assert_allclose(meta["ELEVATION"], encoders.elevation([250.0], [100, 1000])[0],
                             atol=1e-6)
  meta, _, _ = preprocessing.encode_metadata(
      LAYOUT, {"datetime_utc": dt.datetime(2021, 12, 31, 23, 0)})
  np.testing.assert_allclose(meta["TEMPORAL"], encoders.temporal(month=12, hour=23),
                             atol=1e-6)


def test_invalid_values_are_listed_and_zeroed():
  meta, valid, warnings = preprocessing.encode_metadata(
      LAYOUT, {"lat": 95.0, "lon": 0.0, "datetime_utc": 20210310, "elevation_m": float("nan")})
  assert valid.tolist() == [False, False, False]
  assert warnings == ["TEMPORAL invalid: datetime_utc not a datetime or ISO string: 20210310",
                      "SPATIAL invalid: lat/lon out of range: 95.0, 0.0",
                      "ELEVATION invalid: elevation_m not finite: nan"]
  assert all(not v.any() for v in meta.values())


def test_record_reads_the_layout_from_the_labels_file(small_dataset):
  c = tiny_config(small_dataset[0])
  rec = preprocessing.record(c)
  assert rec["image"]["size"] == 32 and rec["image"]["value_range"] == [0.0, 1.0]
  by_name = {m["name"]: m for m in rec["metadata"]}
  assert [m["name"] for m in rec["metadata"]] == ["TEMPORAL", "SPATIAL", "ELEVATION"]
  assert by_name["TEMPORAL"]["columns"][:2] == ["month_sin", "month_cos"]
  scales = by_name["ELEVATION"]["scales"]
  assert len(scales) * 2 == by_name["ELEVATION"]["dim"]
  assert by_name["ELEVATION"]["columns"] == encoders.elevation_column_names(scales)
  assert os.path.exists(c.data.h5.labels_path)


def test_normalize_scales_to_0_1_then_standardises_per_channel():
  x = np.array([[[[0, 51, 255]]]], np.uint8)
  np.testing.assert_allclose(preprocessing.normalize(x), [[[[0.0, 0.2, 1.0]]]], atol=1e-7)
  np.testing.assert_allclose(preprocessing.normalize(x, (0.5, 0.2, 0.5), (0.5, 0.1, 0.25)),
                             [[[[-1.0, 0.0, 2.0]]]], atol=1e-6)


def test_record_holds_the_configs_mean_and_std(small_dataset):
  c = tiny_config(small_dataset[0])
  rec = preprocessing.record(c)
  assert rec["image"]["mean"] is None and rec["image"]["std"] is None  # data.image_mean ()
  assert preprocessing.image_stats(c) == preprocessing.recorded_stats(rec) == (None, None)
  c.data.image_mean, c.data.image_std = (0.5, 0.25, 0.125), (0.2, 0.4, 0.8)
  rec = json.loads(json.dumps(preprocessing.record(c)))  # as preprocessing.json holds it
  assert rec["image"]["mean"] == [0.5, 0.25, 0.125] and rec["image"]["std"] == [0.2, 0.4, 0.8]
  assert rec["image"]["value_range"] == [0.0, 1.0] and rec["image"]["size"] == 32
  assert (preprocessing.image_stats(c) == preprocessing.recorded_stats(rec)
          == ((0.5, 0.25, 0.125), (0.2, 0.4, 0.8)))
  del rec["image"]["mean"], rec["image"]["std"]  # a record from before mean/std: [0, 1]
  assert preprocessing.recorded_stats(rec) == (None, None)


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
  """A photo-like HxWx3 uint8 image: smooth gradients, a dark disc, a bright band, noise."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  a = np.stack([128 + 90 * np.sin(x / w * 3.1 + 0.5) * np.cos(y / h * 2.3),
                100 + 80 * x / w + 40 * np.sin((x + y) / 97),
                150 - 70 * y / h + 30 * np.cos(x / 53)], -1)
  a[(x - 0.6 * w) ** 2 + (y - 0.4 * h) ** 2 < (0.2 * h) ** 2] *= 0.45
  a[int(0.7 * h):int(0.8 * h)] += 50
  a += np.random.default_rng(seed).normal(0, 12, a.shape)
  return np.clip(a, 0, 255).astype(np.uint8)


def _saved(tmp_path, w, h, fmt="JPEG"):
  path = str(tmp_path / f"img_{w}x{h}.{fmt.lower()}")
  Image.fromarray(_photo(w, h)).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  with open(path, "rb") as f:
    return path, f.read()


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path):
  path, data = _saved(tmp_path, 2048, 1536)
  with Image.open(path) as im:
    im.draft("RGB", (384, 384))
    assert im.size == (512, 384)  # DCT scale 1/4
    expected = np.asarray(im.resize((384, 384), Image.Resampling.BOX))
  full = preprocessing.to_rgb_uint8(path, 384, draft=False)
  for src in (path, data):
    out = preprocessing.to_rgb_uint8(src, 384)
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384, draft=False), full)
    diff = np.abs(out.astype(int) - full.astype(int))
    assert (diff > 0).any()  # the reduced decode really happened
    assert diff.mean() < 2.0  # measured: 1.02 levels


def test_jpegs_under_twice_the_size_on_either_side_are_decoded_in_full(tmp_path):
  for w, h in ((700, 700), (767, 1536), (1536, 767)):
    path, data = _saved(tmp_path, w, h)
    full = preprocessing.to_rgb_uint8(path, 384, draft=False)
    for src in (path, data):
      np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384), full)
  path, data = _saved(tmp_path, 768, 768)  # exactly twice: decoded at 1/2, to 384 directly
  with Image.open(path) as im:
    im.draft("RGB", (384, 384))
    expected = np.asarray(im.convert("RGB"))
  assert expected.shape == (384, 384, 3)
  for src in (path, data):
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384), expected)
  assert (expected != preprocessing.to_rgb_uint8(path, 384, draft=False)).any()


def test_large_pngs_are_unaffected_by_draft(tmp_path):
  path, data = _saved(tmp_path, 2048, 2048, "PNG")
  full = preprocessing.to_rgb_uint8(path, 384, draft=False)
  for src in (path, data):
    np.testing.assert_array_equal(preprocessing.to_rgb_uint8(src, 384), full)
  np.testing.assert_array_equal(
      full, np.asarray(Image.fromarray(_photo(2048, 2048)).resize((384, 384),
                                                                  Image.Resampling.BOX)))
