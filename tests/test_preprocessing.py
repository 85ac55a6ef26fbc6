import datetime as dt
import os

import numpy as np

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
