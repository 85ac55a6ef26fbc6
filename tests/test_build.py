"""`python -m linnaeus_jax.data.build`: iNat 2021/2018 JSON and CSV/Parquet tables -> labels.h5.

Every encoded value is checked against numbers computed here by hand (math, not the encoders).
"""

import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from absl import flags
from PIL import Image, ImageFile

from linnaeus_jax import config as config_lib, preprocessing
from linnaeus_jax.data import build, labels

from conftest import ROOT

NAN = float("nan")
EARTHWORM = {"kingdom": "Animalia", "phylum": "Annelida", "class": "Clitellata",
             "order": "Haplotaxida", "family": "Lumbricidae", "genus": "Lumbricus"}
CATEGORIES_2021 = [
    {"id": 0, "name": "Lumbricus terrestris", "common_name": "Common Earthworm",
     "supercategory": "Animalia", **EARTHWORM, "specific_epithet": "terrestris",
     "image_dir_name": "00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_"
                       "terrestris"},
    # The same genus name under another family: a different genus.
    {"id": 1, "name": "Lumbricus rubellus", "common_name": "Red Earthworm",
     "supercategory": "Animalia", **EARTHWORM, "family": "Otheridae",
     "specific_epithet": "rubellus", "image_dir_name": "00001_x"},
    {"id": 2, "name": "Quercus alba", "common_name": "White Oak", "supercategory": "Plants",
     "kingdom": "Plantae", "phylum": "Tracheophyta", "class": "Magnoliopsida",
     "order": "Fagales", "family": "Fagaceae", "genus": "Quercus", "specific_epithet": "alba",
     "image_dir_name": "00002_y"},
]


def image(i, file_name, date, lat, lon):
  """An image entry of the 2021 layout."""
  return {"id": i, "width": 500, "height": 375, "file_name": file_name, "license": 0,
          "rights_holder": "someone", "date": date, "latitude": lat, "longitude": lon,
          "location_uncertainty": 10}


def write_2021(path, images, annotations, categories=CATEGORIES_2021):
  with open(path, "w") as f:  # json.dump writes NaN literals, as the iNat 2021 files have
    json.dump({"info": {"year": 2021, "version": "test"}, "images": images,
               "categories": categories,
               "annotations": [{"id": k, "image_id": i, "category_id": c}
                               for k, (i, c) in enumerate(annotations)],
               "licenses": []}, f)


def options(**kw):
  return build.Options(progress=False, **kw)


def read(path):
  with h5py.File(path, "r") as h5:
    return {k: h5[k][:] for k in h5 if isinstance(h5[k], h5py.Dataset)}, {
        k: dict(h5[k].attrs) for k in h5}


def month_hour(month, hour=None):
  out = [math.sin(2 * math.pi * month / 12), math.cos(2 * math.pi * month / 12)]
  if hour is not None:
    out += [math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24)]
  return out


def xyz(lat, lon):
  la, lo = math.radians(lat), math.radians(lon)
  return [math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)]


def lineage_id(level, *names):
  key = f"L{level}:" + "/".join(names)
  return 1 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % (2**32 - 1)


def config_for(out, images_dir, val=True, **meta):
  """A config reading the built files (two-file mode), images from `images_dir`."""
  c = config_lib.base_config()
  d = c.data
  d.h5.train_labels_path = os.path.join(out, "labels.h5")
  d.h5.val_labels_path = os.path.join(out, "labels_val.h5") if val else ""
  d.hybrid.use_hybrid, d.hybrid.images_dir = True, str(images_dir)
  d.taxonomy.path = os.path.join(out, "taxonomy_tree.json")
  for name, fields in meta.items():
    for k, v in fields.items():
      d.meta.components[name][k] = v
  return c


@pytest.fixture
def inat2021(tmp_path):
  images = [
      image(10, "train/00000_x/a.jpg", "2010-07-14 20:19:00+00:00", 43.8, -71.2),
      image(11, "train/00002_y/b.jpg", "2011-03-02", NAN, NAN),  # no time; NaN coordinates
      image(12, "train/00001_x/c.jpg", "2019-12-31T23:30:00-02:00", 0.0, 0.0),
      image(13, "train/00000_x/d.jpg", "2012-05-05 06:00:00+00:00", None, 10.0),
  ]
  write_2021(tmp_path / "train.json", images, [(10, 0), (11, 2), (12, 1), (13, 0)])
  write_2021(tmp_path / "val.json", [image(20, "val/00002_y/e.jpg", "", 10.0, 20.0)], [(20, 2)])
  return tmp_path


def test_inat2021_every_value(inat2021):
  out = inat2021 / "out"
  report = build.build(options(format="inat", source=str(inat2021 / "train.json"),
                               val_source=str(inat2021 / "val.json"), out=str(out)))
  data, attrs = read(out / "labels.h5")
  assert [x.decode() for x in data["img_identifiers"]] == [
      "train/00000_x/a.jpg", "train/00002_y/b.jpg", "train/00001_x/c.jpg", "train/00000_x/d.jpg"]
  assert list(attrs["temporal"]["column_names"]) == ["month_sin", "month_cos", "hour_sin",
                                                     "hour_cos"]
  t = data["temporal"]
  np.testing.assert_allclose(t[0], month_hour(7, 20), atol=1e-6)
  np.testing.assert_allclose(t[1, :2], month_hour(3), atol=1e-6)  # a date without a time:
  assert np.isnan(t[1, 2:]).all()  # hour unknown, month known
  np.testing.assert_allclose(t[2], month_hour(1, 1), atol=1e-6)  # 23:30 at -02:00 = Jan 1 01:30 UTC
  np.testing.assert_allclose(t[3], month_hour(5, 6), atol=1e-6)
  s = data["spatial"]
  np.testing.assert_allclose(s[0], xyz(43.8, -71.2), atol=1e-6)
  np.testing.assert_array_equal(s[1], [0, 0, 0])  # missing, marked by raw_lat NaN
  np.testing.assert_allclose(s[2], [1, 0, 0], atol=1e-7)  # lat 0 / lon 0 is a real place
  np.testing.assert_array_equal(s[3], [0, 0, 0])  # null latitude: missing
  np.testing.assert_array_equal(data["raw_lat"], np.float32([43.8, NAN, 0.0, NAN]))
  np.testing.assert_array_equal(data["raw_lon"], np.float32([-71.2, NAN, 0.0, 10.0]))
  assert [x.decode() for x in data["raw_date_observed"]] == [
      "2010-07-14 20:19:00+00:00", "2011-03-02", "2019-12-31T23:30:00-02:00",
      "2012-05-05 06:00:00+00:00"]
  assert "in_region" not in data and not any(k.startswith("elevation") for k in data)
  # Name-only taxa: ids from the full lineage; one genus name under two families = two taxa.
  worm = [EARTHWORM[r] for r in ("kingdom", "phylum", "class", "order", "family", "genus")]
  assert data["taxa_L10"][0] == lineage_id(10, *worm, "Lumbricus terrestris")
  assert data["taxa_L20"][0] == lineage_id(20, *worm)
  assert data["taxa_L20"][2] == lineage_id(20, *worm[:4], "Otheridae", "Lumbricus")
  assert data["taxa_L20"][0] != data["taxa_L20"][2]
  assert data["taxa_L40"][0] == data["taxa_L40"][2] == lineage_id(40, *worm[:4])
  assert data["taxa_L10"].dtype == np.uint32 and sorted(data) == sorted(
      ["img_identifiers", "taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40", "temporal", "spatial",
       "raw_lat", "raw_lon", "raw_date_observed"])
  val, _ = read(out / "labels_val.h5")
  assert val["raw_date_observed"][0] == b"" and np.all(val["temporal"][0] == 0)  # no date

  r = report["splits"]["train"]
  assert (r["rows_read"], r["rows_written"], r["dropped"]) == (4, 4, {})
  assert r["validity"] == {"SPATIAL": 0.5, "TEMPORAL": 1.0, "TEMPORAL_HOUR": 0.75}
  assert r["taxa"]["taxa_L10"] == {"taxa": 3, "null_rows": 0}
  assert r["taxa"]["taxa_L40"] == {"taxa": 2, "null_rows": 0}
  assert report["splits"]["val"]["validity"]["TEMPORAL"] == 0.0
  sha = hashlib.sha256((inat2021 / "train.json").read_bytes()).hexdigest()
  assert report["sources"][0]["sha256"] == sha
  assert json.loads((out / "build_report.json").read_text()) == json.loads(json.dumps(report))
  taxa = json.loads((out / "taxa.json").read_text())
  assert taxa["taxa_L10"][str(data["taxa_L10"][0])] == {
      "name": "Lumbricus terrestris", "lineage": "/".join(worm + ["Lumbricus terrestris"]),
      "category_id": 0}
  assert sorted(os.listdir(out)) == ["build_report.json", "labels.h5", "labels_val.h5",
                                     "taxa.json", "taxonomy_tree.json"]


def test_inat2021_rebuild_gives_the_same_ids(inat2021):
  for name in ("a", "b"):
    build.build(options(format="inat", source=str(inat2021 / "train.json"),
                        out=str(inat2021 / name)))
  a, _ = read(inat2021 / "a" / "labels.h5")
  b, _ = read(inat2021 / "b" / "labels.h5")
  for k in ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40"):
    np.testing.assert_array_equal(a[k], b[k])
  assert ((inat2021 / "a" / "taxonomy_tree.json").read_text()
          == (inat2021 / "b" / "taxonomy_tree.json").read_text())


def test_loader_accepts_the_build(inat2021):
  out = inat2021 / "out"
  build.build(options(format="inat", source=str(inat2021 / "train.json"),
                      val_source=str(inat2021 / "val.json"), out=str(out)))
  os.makedirs(inat2021 / "images")
  data = labels.load(config_for(str(out), inat2021 / "images", TEMPORAL={"dim": 4}))
  assert (len(data.train), len(data.val)) == (4, 1)
  # species: 3 (+ none unknown); genus: Lumbricus twice (two families) and Quercus.
  assert data.num_classes == {"taxa_L10": 3, "taxa_L20": 3, "taxa_L30": 3, "taxa_L40": 2}
  # Per row: TEMPORAL (4 columns: row 1 has no hour, so invalid), SPATIAL.
  np.testing.assert_array_equal(data.train.meta_valid,
                                [[1, 1], [0, 0], [1, 1], [1, 0]])
  assert data.nonfinite_meta == {"TEMPORAL": 1, "SPATIAL": 0}
  # The month alone (two of the four columns) is valid wherever a date is.
  data = labels.load(config_for(str(out), inat2021 / "images",
                                TEMPORAL={"columns": ("month_sin", "month_cos")}))
  np.testing.assert_array_equal(data.train.meta_valid[:, 0], [1, 1, 1, 1])
  np.testing.assert_allclose(data.train.meta["TEMPORAL"][1], month_hour(3), atol=1e-6)
  np.testing.assert_array_equal(data.val.meta_valid, [[0, 1]])

  # A tree for data.partial.levels=True (class 0 = unknown at every rank) on request.
  build.build(options(format="inat", source=str(inat2021 / "train.json"),
                      val_source=str(inat2021 / "val.json"), out=str(out),
                      partial_levels="true", overwrite=True))
  c = config_for(str(out), inat2021 / "images", TEMPORAL={"dim": 4})
  c.data.partial.levels = True
  data = labels.load(c)
  assert data.num_classes == {"taxa_L10": 4, "taxa_L20": 4, "taxa_L30": 4, "taxa_L40": 3}
  fam, order = data.class_to_idx["taxa_L30"], data.class_to_idx["taxa_L40"]
  parent = data.taxonomy.parents["taxa_L30"]
  worm = [EARTHWORM[r] for r in ("kingdom", "phylum", "class", "order", "family")]
  plant = ["Plantae", "Tracheophyta", "Magnoliopsida", "Fagales"]
  assert parent[0] == -1  # the null class
  assert parent[fam[lineage_id(30, *worm)]] == order[lineage_id(40, *worm[:4])]
  assert parent[fam[lineage_id(30, *worm[:4], "Otheridae")]] == order[lineage_id(40, *worm[:4])]
  assert parent[fam[lineage_id(30, *plant, "Fagaceae")]] == order[lineage_id(40, *plant)]

  from linnaeus_jax import resolve as resolve_lib  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.tools import inspect_dataset  # pylint: disable=g-import-not-at-top
  _, data = resolve_lib.resolve(c)
  s = inspect_dataset.summary(data, partial=True)
  assert (s["rows_total"], s["rows_train"], s["rows_val"]) == (5, 4, 1)


def test_inat2018_layout_with_locations_and_categories(tmp_path):
  # 2018: obfuscated names in the main files, the real taxonomy in categories.json and the
  # coordinates/dates in <split>2018_locations.json (lists of {id, lat, lon, date, ...}).
  obfuscated = [{"id": c["id"], "name": f"x{c['id']}", "supercategory": "s"}
                for c in CATEGORIES_2021]
  full = [{k: c[k] for k in ("id", "name", "supercategory", "kingdom", "phylum", "class",
                             "order", "family", "genus")} for c in CATEGORIES_2021]
  imgs = [{"id": i, "width": 800, "height": 600, "license": 1, "rights_holder": "r",
           "file_name": f"train_val2018/Plantae/{i}/{i}.jpg"} for i in (5, 6, 7, 8)]
  write_2021(tmp_path / "train2018.json", imgs[:3], [(5, 2), (6, 0), (7, 1)], obfuscated)
  write_2021(tmp_path / "val2018.json", imgs[3:], [(8, 2)], obfuscated)
  (tmp_path / "categories.json").write_text(json.dumps(full))
  locs = [{"id": 5, "lat": -33.5, "lon": 151.25, "loc_uncert": 10, "date": "2012-05-05",
           "date_c": 0.4, "user_id": 1, "valid": True},
          {"id": 6, "lat": None, "lon": None, "loc_uncert": None,
           "date": "2013-11-20 08:15:00+00:00", "date_c": 0.9, "user_id": 2, "valid": True},
          {"id": 7, "lat": 12.0, "lon": 170.0, "loc_uncert": 5, "date": None, "date_c": None,
           "user_id": 3, "valid": False}]
  (tmp_path / "train2018_locations.json").write_text(json.dumps(locs))
  (tmp_path / "val2018_locations.json").write_text(json.dumps([{**locs[0], "id": 8}]))
  out = tmp_path / "out"
  report = build.build(options(
      format="inat", source=str(tmp_path / "train2018.json"),
      val_source=str(tmp_path / "val2018.json"), categories=str(tmp_path / "categories.json"),
      locations=str(tmp_path / "train2018_locations.json"),
      val_locations=str(tmp_path / "val2018_locations.json"), out=str(out),
      ranks=(10, 20, 30, 40, 50, 60, 70)))
  data, attrs = read(out / "labels.h5")
  assert data["taxa_L10"][0] == lineage_id(10, "Plantae", "Tracheophyta", "Magnoliopsida",
                                           "Fagales", "Fagaceae", "Quercus", "Quercus alba")
  assert data["taxa_L70"][1] == lineage_id(70, "Animalia")
  assert sorted(k for k in data if k.startswith("taxa_")) == [
      f"taxa_L{r}" for r in (10, 20, 30, 40, 50, 60, 70)]
  np.testing.assert_allclose(data["spatial"][0], xyz(-33.5, 151.25), atol=1e-6)
  np.testing.assert_allclose(data["temporal"][0, :2], month_hour(5), atol=1e-6)
  assert np.isnan(data["temporal"][0, 2:]).all()  # date only
  np.testing.assert_allclose(data["temporal"][1], month_hour(11, 8), atol=1e-6)
  assert np.isnan(data["raw_lat"][1]) and data["raw_date_observed"][2] == b""
  np.testing.assert_allclose(data["spatial"][2], xyz(12.0, 170.0), atol=1e-6)
  assert report["splits"]["val"]["rows_written"] == 1
  assert len(report["sources"]) == 5  # main, categories, locations: train and val


def write_table(tmp_path, rows, header):
  path = tmp_path / "obs.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


TABLE_HEADER = ["path", "sp", "gen", "fam", "ord", "lat", "lon", "observed", "elev_m"]
TABLE_ROWS = [
    ["img/1.jpg", "Turdus migratorius", "Turdus", "Turdidae", "Passeriformes", "42.5", "-71.25",
     "2021-05-06T14:00:00Z", "1000"],
    ["img/2.jpg", "", "Turdus", "Turdidae", "Passeriformes", "", "", "2021-12-24", ""],
    ["img/3.jpg", "Quercus alba", "Quercus", "Fagaceae", "Fagales", "0", "0",
     "2020-01-15 03:00:00+01:00", "0"],
]
TABLE_COLUMNS = (("date", "observed"), ("elevation", "elev_m"), ("family", "fam"),
                 ("genus", "gen"), ("image", "path"), ("latitude", "lat"),
                 ("longitude", "lon"), ("order", "ord"), ("species", "sp"))


def test_table_csv_values_and_parquet_gives_the_same(tmp_path):
  csv_path = write_table(tmp_path, TABLE_ROWS, TABLE_HEADER)
  build.build(options(format="table", source=str(csv_path), columns=TABLE_COLUMNS,
                      out=str(tmp_path / "csv"), bbox=(40.0, 50.0, 170.0, -60.0)))
  data, attrs = read(tmp_path / "csv" / "labels.h5")
  np.testing.assert_allclose(data["temporal"][0], month_hour(5, 14), atol=1e-6)
  np.testing.assert_allclose(data["temporal"][1, :2], month_hour(12), atol=1e-6)
  assert np.isnan(data["temporal"][1, 2:]).all()
  np.testing.assert_allclose(data["temporal"][2], month_hour(1, 2), atol=1e-6)  # 03:00+01 = 02 UTC
  np.testing.assert_allclose(data["spatial"][0], xyz(42.5, -71.25), atol=1e-6)
  np.testing.assert_allclose(data["spatial"][2], [1, 0, 0], atol=1e-7)
  assert np.isnan(data["raw_lat"][1]) and data["raw_lat"][2] == 0.0
  e = data["elevation_broadrange_2"]
  assert list(attrs["elevation_broadrange_2"]["column_names"])[:2] == ["elev_100_sin",
                                                                       "elev_100_cos"]
  expected = []
  for s in (100, 500, 1000, 2000, 5000):
    expected += [math.sin(2 * math.pi * 1000 / s), math.cos(2 * math.pi * 1000 / s)]
  np.testing.assert_allclose(e[0], expected, atol=1e-6)
  np.testing.assert_array_equal(e[1], [0, 1] * 5)  # missing: the original's null form ...
  assert np.isnan(data["raw_elevation"][1])  # ... marked missing by the raw column
  np.testing.assert_allclose(e[2], [0, 1] * 5, atol=1e-7)  # a real 0 m
  assert data["raw_elevation"][2] == 0.0
  assert data["taxa_L10"][1] == 0  # unknown species
  assert data["taxa_L20"][1] == data["taxa_L20"][0] == lineage_id(
      20, "", "", "", "Passeriformes", "Turdidae", "Turdus")
  # bbox 40..50 N, 170 E across 180 to 60 W: row 0 inside, row 1 unknown (kept), row 2 outside.
  np.testing.assert_array_equal(data["in_region"], [1, 1, 0])

  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.table({
      "path": [r[0] for r in TABLE_ROWS], "sp": [r[1] or None for r in TABLE_ROWS],
      "gen": [r[2] for r in TABLE_ROWS], "fam": [r[3] for r in TABLE_ROWS],
      "ord": [r[4] for r in TABLE_ROWS], "lat": [42.5, None, 0.0], "lon": [-71.25, None, 0.0],
      "observed": [r[7] for r in TABLE_ROWS], "elev_m": [1000.0, None, 0.0]})
  pq.write_table(table, tmp_path / "obs.parquet")
  build.build(options(format="table", source=str(tmp_path / "obs.parquet"),
                      columns=TABLE_COLUMNS, out=str(tmp_path / "pq"),
                      bbox=(40.0, 50.0, 170.0, -60.0)))
  other, _ = read(tmp_path / "pq" / "labels.h5")
  assert sorted(other) == sorted(data)
  for k in data:
    np.testing.assert_array_equal(other[k], data[k], err_msg=k)


def test_table_taxa_by_id_and_default_columns(tmp_path):
  path = write_table(tmp_path, [["a.jpg", "12345", "678", "2020-02-02T10:00:00"],
                                ["b.jpg", "", "678", ""]],
                     ["image", "species_id", "genus_id", "date"])
  report = build.build(options(format="table", source=str(path), out=str(tmp_path / "o"),
                               columns=build.parse_columns("image=image,species_id=species_id,"
                                                           "genus_id=genus_id,date=date")))
  data, _ = read(tmp_path / "o" / "labels.h5")
  np.testing.assert_array_equal(data["taxa_L10"], [12345, 0])
  np.testing.assert_array_equal(data["taxa_L20"], [678, 678])
  assert report["ranks"] == ["taxa_L10", "taxa_L20"]  # the ranks the table has
  assert report["partial_levels"] is True  # a species is unknown: null class in the tree
  tree = json.loads((tmp_path / "o" / "taxonomy_tree.json").read_text())
  assert tree["num_classes"] == {"taxa_L10": 2, "taxa_L20": 2}
  assert tree["hierarchy_map_raw"] == {"taxa_L10": {"1": 1}}
  with pytest.raises(build.BuildError, match="the source has no .*family"):
    build.build(options(format="table", source=str(path), out=str(tmp_path / "p"),
                        columns=(("genus_id", "genus_id"), ("image", "image")), ranks=(30,)))


BAD_ROWS = [
    ["ok/1.jpg", "A a", "A", "F", "O", "10", "20", "2020-01-01", ""],
    ["ok/1.jpg", "A a", "A", "F", "O", "10", "20", "2020-01-01", ""],  # duplicate image
    ["ok/2.jpg", "A a", "A", "F", "O", "91", "20", "2020-01-01", ""],  # latitude out of range
    ["ok/3.jpg", "A a", "A", "F", "O", "10", "abc", "2020-01-01", ""],  # garbage longitude
    ["ok/4.jpg", "A a", "A", "F", "O", "10", "20", "2020-13-01", ""],  # no such month
    ["ok/5.jpg", "A a", "A", "F", "O", "nan", "", "", "9999999"],  # elevation out of range
    ["../6.jpg", "A a", "A", "F", "O", "", "", "", ""],  # outside the images folder
    ["ok/7.jpg", "B b", "B", "F", "O", "-90", "180", "2020-06-30T12:00:00", "-5"],
]


def test_taxon_id_collision_is_an_error(tmp_path):
  # Two species names whose lineage hashes agree (found by search): refused, both named.
  assert lineage_id(10, "", "", "", "", "", "", "n11288") == lineage_id(
      10, "", "", "", "", "", "", "n12437") == 661508129
  path = write_table(tmp_path, [["a.jpg", "n11288"], ["b.jpg", "n12437"]], ["image", "species"])
  with pytest.raises(build.BuildError, match="collision at rank species: '//////n11288' and "
                     "'//////n12437' both hash to 661508129"):
    build.build(options(format="table", source=str(path), out=str(tmp_path / "o"),
                        columns=(("image", "image"), ("species", "species"))))


def test_bad_rows_are_fatal_by_default(tmp_path):
  path = write_table(tmp_path, BAD_ROWS, TABLE_HEADER)
  out = tmp_path / "out"
  with pytest.raises(build.BuildError) as e:
    build.build(options(format="table", source=str(path), columns=TABLE_COLUMNS, out=str(out)))
  msg = str(e.value)
  assert msg.startswith("6 bad rows (train: bad_image_path 1, duplicate_image 1, "
                        "bad_coordinates 2, bad_date 1, bad_elevation 1)")
  for row, reason in ((1, "duplicate_image"), (2, "bad_coordinates"), (3, "bad_coordinates"),
                      (4, "bad_date"), (5, "bad_elevation"), (6, "bad_image_path")):
    assert f"train row {row} " in msg and reason in msg
  assert "'abc'" in msg and "'2020-13-01'" in msg
  assert not os.path.exists(out)  # nothing written: the rows are checked before any file


def test_bad_rows_dropped_and_listed(tmp_path):
  path = write_table(tmp_path, BAD_ROWS, TABLE_HEADER)
  out = tmp_path / "out"
  report = build.build(options(format="table", source=str(path), columns=TABLE_COLUMNS,
                               out=str(out), on_bad_row="drop"))
  r = report["splits"]["train"]
  assert (r["rows_read"], r["rows_written"]) == (8, 2)
  assert r["dropped"] == {"bad_image_path": 1, "duplicate_image": 1, "bad_coordinates": 2,
                          "bad_date": 1, "bad_elevation": 1}
  listed = {(d["row"], d["reason"]) for d in report["dropped_rows"]}
  assert listed == {(1, "duplicate_image"), (2, "bad_coordinates"), (3, "bad_coordinates"),
                    (4, "bad_date"), (5, "bad_elevation"), (6, "bad_image_path")}
  data, _ = read(out / "labels.h5")
  assert [x.decode() for x in data["img_identifiers"]] == ["ok/1.jpg", "ok/7.jpg"]
  np.testing.assert_allclose(data["spatial"][1], xyz(-90, 180), atol=1e-6)  # the extremes are valid
  np.testing.assert_allclose(data["temporal"][1], month_hour(6, 12), atol=1e-6)
  assert data["raw_elevation"][1] == -5.0


def test_inat_bad_rows_and_missing_images(tmp_path):
  imgs = [image(1, "a.jpg", "2020-01-01", 1.0, 2.0), image(2, "b.jpg", "2020-01-01", 1.0, 2.0),
          image(2, "c.jpg", "2020-01-01", 1.0, 2.0), image(3, "d.jpg", "2020-01-01", 1.0, 2.0),
          image(4, "e.jpg", "2020-01-01", 1.0, 2.0)]
  write_2021(tmp_path / "t.json", imgs, [(1, 0), (2, 0), (3, 99), (7, 1)])
  (tmp_path / "img").mkdir()
  for name in ("a.jpg", "c.jpg", "d.jpg"):
    (tmp_path / "img" / name).write_bytes(b"x")
  # The cheap check: only whether the file exists (these one-byte files would not decode).
  report = build.build(options(format="inat", source=str(tmp_path / "t.json"),
                               out=str(tmp_path / "o"), images_root=str(tmp_path / "img"),
                               check_images=True, check_images_mode="exists",
                               on_bad_row="drop"))
  assert report["image_check"] == "exists"
  assert report["splits"]["train"]["dropped"] == {
      "duplicate_image": 1, "missing_image_file": 1, "no_annotation": 1,
      "unknown_category": 1, "annotation_unknown_image": 1}
  reasons = {(d["row"], d["reason"]) for d in report["dropped_rows"]}
  assert reasons == {(2, "duplicate_image"), (1, "missing_image_file"), (4, "no_annotation"),
                     (3, "unknown_category"), (None, "annotation_unknown_image")}
  data, _ = read(tmp_path / "o" / "labels.h5")
  assert [x.decode() for x in data["img_identifiers"]] == ["a.jpg"]
  assert {d["detail"] for d in report["dropped_rows"] if d["row"] == 1} == {
      f"image missing: {tmp_path / 'img' / 'b.jpg'} does not exist"}
  with pytest.raises(build.BuildError, match="5 bad rows"):
    build.build(options(format="inat", source=str(tmp_path / "t.json"), out=str(tmp_path / "p"),
                        images_root=str(tmp_path / "img"), check_images=True,
                        check_images_mode="exists"))


def test_json_stream_across_buffer_boundaries(tmp_path):
  # ~6 MB: values cut by the 4 MB read buffer, NaN and -Infinity literals anywhere.
  n = 30000
  imgs = [image(i, f"train/x/{i:06d}_{'p' * 120}.jpg", "2020-02-29 23:59:00+00:00",
                NAN if i % 7 == 0 else (-90.0 + i * 0.001), 12.5) for i in range(n)]
  imgs[12345]["longitude"] = float("-inf")
  write_2021(tmp_path / "big.json", imgs, [(i, i % 3) for i in range(n)])
  assert os.path.getsize(tmp_path / "big.json") > 5 << 20
  report = build.build(options(format="inat", source=str(tmp_path / "big.json"),
                               out=str(tmp_path / "o"), on_bad_row="drop"))
  assert report["splits"]["train"]["dropped"] == {"bad_coordinates": 1}
  assert report["dropped_rows"][0]["row"] == 12345
  data, _ = read(tmp_path / "o" / "labels.h5")
  assert len(data["img_identifiers"]) == n - 1
  assert data["img_identifiers"][-1] == f"train/x/{n - 1:06d}_{'p' * 120}.jpg".encode()
  lat = data["raw_lat"]
  assert int(np.isnan(lat).sum()) == len(range(0, n, 7))
  np.testing.assert_allclose(lat[1], -89.999, atol=1e-5)


def test_values_and_ids_by_hand():
  assert build.parse_when("2010-07-14 20:19:00+00:00") == (7, 20, "2010-07-14 20:19:00+00:00")
  assert build.parse_when("2010-07-14") == (7, -1, "2010-07-14")
  assert build.parse_when("2020-03-01T01:00:00+05:00")[:2] == (2, 20)  # UTC, as inference
  assert build.parse_when(" ") == (0, -1, "") and build.parse_when(None) == (0, -1, "")
  for bad in ("2010-02-30", "14/07/2010", "2010-07-14 25:00"):
    with pytest.raises(ValueError):
      build.parse_when(bad)
  col, bad = build.numbers([1.5, None, "", "nan", "-3", "x"])
  np.testing.assert_array_equal(col[:2], [1.5, NAN])
  assert np.isnan(col[2]) and np.isnan(col[3]) and col[4] == -3 and bad == {5: "not a number: 'x'"}
  assert build.taxon_id(20, ["Animalia", "Chordata"]) == lineage_id(20, "Animalia", "Chordata")
  assert 1 <= build.taxon_id(10, [""]) <= 2**32 - 1
  np.testing.assert_array_equal(build.in_region(np.array([0.0, 0, NAN]), np.array([179.0, -179, 0]),
                                                (-1, 1, 178, -178)), [1, 1, 1])
  np.testing.assert_array_equal(build.in_region(np.array([0.0, 2.0]), np.array([0.0, 179.0]),
                                                (-1, 1, 178, -178)), [0, 0])
  assert build.parse_columns("image=p, species = s") == (("image", "p"), ("species", "s"))
  with pytest.raises(build.BuildError, match="unknown keys"):
    build.parse_columns("img=p")


def test_columns_file_and_cli_errors(tmp_path):
  path = write_table(tmp_path, BAD_ROWS[:1] + BAD_ROWS[2:3], TABLE_HEADER)
  mapping = tmp_path / "cols.yaml"
  mapping.write_text("".join(f"{k}: {v}\n" for k, v in TABLE_COLUMNS))
  assert build.parse_columns(str(mapping)) == TABLE_COLUMNS
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.data.build", "--format=table",
                      f"--source={path}", f"--columns={mapping}", f"--out={tmp_path / 'o'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: 1 bad rows (train: bad_coordinates 1)")
  assert "train row 1 (ok/2.jpg): bad_coordinates: lat 91.0, lon 20.0 out of range" in lines[0]
  assert not os.path.exists(tmp_path / "o" / "labels.h5")
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.data.build", "--format=table",
                      f"--source={path}", f"--columns={mapping}", f"--out={tmp_path / 'o'}",
                      "--on_bad_row=drop", "--ranks=genus,family", "--noprogress"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / "o" / "build_report.json").read_text())
  assert report["ranks"] == ["taxa_L20", "taxa_L30"]


def test_pack_images(tmp_path):
  shards = pytest.importorskip("linnaeus_jax.data.shards")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows = []
  (tmp_path / "img").mkdir()
  for i in range(5):
    Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
    rows.append([f"{i}.jpg", "A a", "A", "F", "O", "", "", "", ""])
  path = write_table(tmp_path, rows, TABLE_HEADER)
  report = build.build(options(format="table", source=str(path), columns=TABLE_COLUMNS,
                               out=str(tmp_path / "o"), images_root=str(tmp_path / "img"),
                               pack_images=True, shard_size=2))
  assert report["shards"] == {"images": [shards.shard_name("images", k, 3) for k in range(3)]}
  for name in report["shards"]["images"]:
    assert os.path.exists(tmp_path / "o" / name)


@pytest.mark.slow
def test_a_built_table_trains_the_same_from_the_folder_and_from_shards(tmp_path):
  """A table of JPEGs built twice, into hybrid mode and into packed shards: the dataset
  summary is as written, and 20 training steps from either see identical batches (same
  losses to the bit)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import resolve as resolve_lib, train  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.tools import inspect_dataset  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  (tmp_path / "images").mkdir()
  rows = []
  for i in range(40):
    sp = i % 4
    arr = np.full((48, 40, 3), 60 * sp, np.uint8) + rng.integers(0, 20, (48, 40, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "images" / f"{i}.jpg", quality=90)
    rows.append([f"{i}.jpg", f"G{sp // 2} s{sp}", f"G{sp // 2}", f"F{sp // 2}", "O",
                 f"{10 * sp}", f"{20 * sp}", f"2020-{sp + 1:02d}-10", f"{100 * sp}"])
  path = write_table(tmp_path, rows, TABLE_HEADER)
  build.build(options(format="table", source=str(path), columns=TABLE_COLUMNS,
                      out=str(tmp_path / "built"), images_root=str(tmp_path / "images"),
                      pack_images=True, shard_size=16))
  losses = {}
  for mode in ("folder", "shards"):
    c = tiny_config(str(tmp_path / "built"), steps=20)
    c.data.hybrid.images_dir = str(tmp_path / "images")
    if mode == "shards":
      c.data.hybrid.use_hybrid = False
      c.data.h5.images_path = str(tmp_path / "built" / "images-*.h5")
    c.data.taxonomy.path = str(tmp_path / "built" / "taxonomy_tree.json")
    c.data.partial.levels = False  # every rank is known: the tree was built without a null class
    c.schedule.checkpoint.interval_steps = 0
    _, data = resolve_lib.resolve(c)
    s = inspect_dataset.summary(data, partial=False)
    assert s["rows_total"] == 40 and data.num_classes == {
        "taxa_L10": 4, "taxa_L20": 2, "taxa_L30": 2, "taxa_L40": 1}
    train.run(c, str(tmp_path / mode))
    records = [json.loads(l) for l in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
               if l]
    losses[mode] = [r["loss"] for r in records if r["phase"] == "train"]
  assert len(losses["folder"]) == 20
  assert losses["folder"] == losses["shards"]


def test_configs_inat21_reads_a_built_inat2021_dataset(inat2021):
  """configs/inat21.py with the three paths its docstring names reads a 2021 build."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import resolve as resolve_lib  # pylint: disable=g-import-not-at-top
  out = inat2021 / "out"
  build.build(options(format="inat", source=str(inat2021 / "train.json"),
                      val_source=str(inat2021 / "val.json"), out=str(out),
                      partial_levels="true"))
  os.makedirs(inat2021 / "images")
  spec = importlib.util.spec_from_file_location("inat21",
                                                os.path.join(ROOT, "configs", "inat21.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.h5.train_labels_path = str(out / "labels.h5")
  c.data.h5.val_labels_path = str(out / "labels_val.h5")
  c.data.hybrid.images_dir = str(inat2021 / "images")
  c.data.batch_size = c.data.batch_size_val = 2
  c, data = resolve_lib.resolve(c)
  assert (len(data.train), len(data.val)) == (4, 1)
  assert data.num_classes == {"taxa_L10": 4, "taxa_L20": 4, "taxa_L30": 4, "taxa_L40": 3}
  assert [n for n, _ in config_lib.enabled_components(c)] == ["TEMPORAL", "SPATIAL"]
  np.testing.assert_array_equal(data.train.meta_valid, [[1, 1], [0, 0], [1, 1], [1, 0]])


# ----------------------------------------------------------------------------- images, --out


def write_images(folder):
  """Tiny image files: {name: None for a good one, else (reason, start of the detail)}. The
  good ones are smooth 60 x 80 pictures (re-encoded under --max_side=48) in RGB, CMYK and grey
  JPEG and a PNG named .jpg; the bad ones missing, a folder, empty, cut short, not images."""
  folder.mkdir()
  y, x = np.mgrid[0:60, 0:80]
  rgb = Image.fromarray(np.stack([3 * x, 4 * y, 60 + x + y], -1).astype(np.uint8))
  rgb.save(folder / "rgb.jpg", quality=95)
  rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
  rgb.convert("L").save(folder / "grey.jpg", quality=95)
  rgb.save(folder / "png.jpg", format="PNG")
  (folder / "empty.jpg").write_bytes(b"")
  jpeg, png = (folder / "rgb.jpg").read_bytes(), (folder / "png.jpg").read_bytes()
  (folder / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  (folder / "cut.png").write_bytes(png[:len(png) // 2])
  (folder / "text.jpg").write_bytes(b"not an image at all")
  (folder / "dir.jpg").mkdir()
  bad = "unreadable_image"
  return {"rgb.jpg": None, "empty.jpg": (bad, "image unreadable: zero-byte file"),
          "cmyk.jpg": None,
          "cut.jpg": (bad, "image unreadable: truncated (image file is truncated"),
          "grey.jpg": None,
          "gone.jpg": ("missing_image_file", f"image missing: {folder}/gone.jpg does not exist"),
          "png.jpg": None, "cut.png": (bad, "image unreadable: truncated ("),
          "text.jpg": (bad, "image unreadable: not an image format PIL can read"),
          "dir.jpg": ("missing_image_file", f"image missing: {folder}/dir.jpg is not a file")}


SPECIES_COLUMNS = (("image", "image"), ("species", "species"))


def species_table(path, names, species="A a"):
  """A table with the columns named like the keys (SPECIES_COLUMNS; the default of the command
  line): image, species."""
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([["image", "species"]] + [[n, species] for n in names])
  return str(path)


def listing(folder):
  """{name: sha256} of the files of `folder`."""
  return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in os.listdir(folder)}


def test_check_images_decodes_every_image(tmp_path):
  expected = write_images(tmp_path / "img")
  source = species_table(tmp_path / "obs.csv", list(expected))
  good = [n for n, bad in expected.items() if bad is None]
  kw = dict(format="table", source=source, columns=SPECIES_COLUMNS,
            images_root=str(tmp_path / "img"), check_images=True)
  report = build.build(options(out=str(tmp_path / "o"), on_bad_row="drop", **kw))
  assert report["image_check"] == "decode"
  assert report["splits"]["train"]["dropped"] == {"missing_image_file": 2, "unreadable_image": 4}
  dropped = {d["image"]: (d["reason"], d["detail"]) for d in report["dropped_rows"]}
  assert sorted(dropped) == sorted(n for n in expected if n not in good)
  for name, (reason, detail) in dropped.items():
    assert reason == expected[name][0] and detail.startswith(expected[name][1]), (name, detail)
  data, _ = read(tmp_path / "o" / "labels.h5")
  assert [x.decode() for x in data["img_identifiers"]] == good  # CMYK, grey, PNG as .jpg: good

  with pytest.raises(build.BuildError) as e:  # by default: all listed at once, nothing written
    build.build(options(out=str(tmp_path / "p"), **kw))
  assert str(e.value).startswith("6 bad rows (train: missing_image_file 2, unreadable_image 4)")
  assert all(f"({name}): {expected[name][0]}: {expected[name][1]}" in str(e.value)
             for name in dropped)
  assert not os.path.exists(tmp_path / "p")

  # The old, cheap check: only the missing files.
  report = build.build(options(out=str(tmp_path / "q"), on_bad_row="drop",
                               check_images_mode="exists", **kw))
  assert report["splits"]["train"]["dropped"] == {"missing_image_file": 2}


def test_decoding_in_a_process_pool_gives_the_same_and_shows_progress(tmp_path, capsys,
                                                                      monkeypatch):
  expected = write_images(tmp_path / "img")
  paths = [str(tmp_path / "img" / n) for n in expected]
  want = {i: bad for i, bad in enumerate(expected.values()) if bad is not None}
  done = []
  pooled = build.decode_problems(paths, workers=2, chunk=3, on_progress=done.append)
  assert pooled == build.decode_problems(paths, workers=1)
  assert {i: (r, d[:len(want[i][1])]) for i, (r, d) in pooled.items()} == want
  assert done == [3, 6, 9, 10]  # after each chunk, in order
  split = build.read_table("train", species_table(tmp_path / "obs.csv", list(expected)),
                           SPECIES_COLUMNS, str(tmp_path / "img"),
                           build.Taxa(), build.Progress(False), {})
  build.check_image_files(split, str(tmp_path / "img"), build.Progress(True), "decode",
                          workers=2, chunk=4)
  assert "build: train: decoded 10 images, 6 bad" in capsys.readouterr().err
  assert build.bad_counts(split) == {"missing_image_file": 2, "unreadable_image": 4}
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # cut files would pass
  with pytest.raises(build.BuildError, match="LOAD_TRUNCATED_IMAGES is on"):
    build.decode_problems(paths)


@pytest.mark.parametrize("max_side", [48, 0])
def test_pack_images_makes_undecodable_images_bad_rows(tmp_path, max_side):
  """Packing decodes every image first: bad ones are bad rows (all listed, nothing written, no
  empty --out), or dropped from labels and shards alike; the packed rows read as the files."""
  expected = write_images(tmp_path / "img")
  good = [n for n, bad in expected.items() if bad is None]
  kw = dict(format="table", source=species_table(tmp_path / "obs.csv", list(expected)),
            columns=SPECIES_COLUMNS, images_root=str(tmp_path / "img"), pack_images=True,
            shard_size=3,
            max_side=max_side)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(build.BuildError, match=r"^6 bad rows \(train: missing_image_file 2, "
                     r"unreadable_image 4\)"):
    build.build(options(out=str(tmp_path / "o"), **kw))
  assert sorted(os.listdir(tmp_path)) == before  # no --out, no temporary folder
  report = build.build(options(out=str(tmp_path / "o"), on_bad_row="drop", **kw))
  assert report["image_check"] == "decode" and report["shards"] == {
      "images": ["images-00000-of-00002.h5", "images-00001-of-00002.h5"]}
  assert report["splits"]["train"]["rows_written"] == 4
  data, _ = read(tmp_path / "o" / "labels.h5")
  assert [x.decode() for x in data["img_identifiers"]] == good
  reader = pytest.importorskip("linnaeus_jax.data.shards").ShardReader(
      str(tmp_path / "o" / "images-*.h5"))
  assert len(reader) == len(good)
  for row, name in enumerate(good):
    packed = reader.encoded(row)
    if max_side == 0:
      assert packed == (tmp_path / "img" / name).read_bytes()
    else:
      assert Image.open(io.BytesIO(packed)).size == (64, 48)  # short side 60 -> 48
    np.testing.assert_allclose(preprocessing.to_rgb_uint8(packed, 24, draft=False),
                               preprocessing.to_rgb_uint8(str(tmp_path / "img" / name), 24,
                                                          draft=False), atol=6, err_msg=name)


def test_a_non_empty_out_is_refused_and_overwrite_replaces_the_whole_build(tmp_path):
  write_images(tmp_path / "img")
  out = tmp_path / "out"
  build.build(options(format="table", source=species_table(tmp_path / "a.csv", [
      "rgb.jpg", "cmyk.jpg", "grey.jpg"]), val_source=species_table(tmp_path / "v.csv", [
          "png.jpg"]), columns=SPECIES_COLUMNS, out=str(out), images_root=str(tmp_path / "img"),
      pack_images=True, shard_size=1))
  (out / "notes.txt").write_text("kept by hand")
  earlier = listing(out)
  assert len(earlier) == 10 and "labels_val.h5" in earlier and "images-00002-of-00003.h5" in earlier
  source = species_table(tmp_path / "b.csv", ["grey.jpg", "rgb.jpg"], species="B b")
  cmd = [sys.executable, "-m", "linnaeus_jax.data.build", "--format=table", f"--source={source}",
         f"--out={out}", f"--images_root={tmp_path / 'img'}", "--pack_images", "--shard_size=2",
         "--noprogress"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.splitlines() == [f"error: --out {out} is not empty (10 files, e.g. labels.h5); "
                                   "pass --overwrite to replace the earlier build"]
  assert listing(out) == earlier
  r = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ["build_report.json", "images-00000-of-00001.h5",
                                     "labels.h5", "taxa.json", "taxonomy_tree.json"]
  data, _ = read(out / "labels.h5")
  assert [x.decode() for x in data["img_identifiers"]] == ["grey.jpg", "rgb.jpg"]
  assert sorted(os.listdir(tmp_path)) == ["a.csv", "b.csv", "img", "out", "v.csv"]


def test_a_failing_build_leaves_the_earlier_build_as_it_was(tmp_path, monkeypatch):
  write_images(tmp_path / "img")
  source = species_table(tmp_path / "a.csv", ["rgb.jpg", "grey.jpg"])
  kw = dict(format="table", source=source, columns=SPECIES_COLUMNS,
            images_root=str(tmp_path / "img"), pack_images=True)
  build.build(options(out=str(tmp_path / "out"), **kw))
  earlier = listing(tmp_path / "out")

  def disk_full(opts, tables, files, out_dir):  # fails halfway through writing the shards
    (tmp_path / "seen").write_text(out_dir)
    with open(os.path.join(out_dir, "images-00000-of-00001.h5"), "wb") as f:
      f.write(b"half")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(build, "pack_images", disk_full)
  for out in ("out", "new"):
    with pytest.raises(OSError, match="No space left"):
      build.build(options(out=str(tmp_path / out), overwrite=True, **kw))
    work = (tmp_path / "seen").read_text()
    assert os.path.dirname(work) == str(tmp_path) and not os.path.exists(work)
  assert listing(tmp_path / "out") == earlier  # untouched, and no empty --out for a new one
  assert sorted(os.listdir(tmp_path)) == ["a.csv", "img", "out", "seen"]


def test_flags_check_modes_overwrite_and_out_checks(tmp_path):
  source = species_table(tmp_path / "a.csv", ["x.jpg"])

  def parse(*args):
    fv = flags.FlagValues()
    build.define_flags(fv)
    fv(["build", "--format=table", f"--source={source}", f"--out={tmp_path / 'o'}", *args])
    return build.options_from_flags(fv)
  opts = parse("--check_images", f"--images_root={tmp_path}")
  assert (opts.check_images, opts.check_images_mode, opts.overwrite) == (True, "decode", False)
  assert build.image_check_mode(opts) == "decode"
  opts = parse("--check_images", "--check_images_mode=exists", "--overwrite")
  assert (opts.check_images_mode, opts.overwrite, build.image_check_mode(opts)) == (
      "exists", True, "exists")
  assert build.image_check_mode(parse()) == ""
  # --pack_images decodes whatever the mode: a packed image must decode.
  assert build.image_check_mode(parse("--pack_images", "--check_images_mode=exists",
                                      "--check_images")) == "decode"
  with pytest.raises(build.BuildError, match="--check_images_mode needs --check_images"):
    parse("--check_images_mode=exists")
  # --overwrite replaces --out as a whole: never a folder holding the sources or the images.
  table = lambda out, **kw: options(format="table", source=source, columns=SPECIES_COLUMNS,
                                    out=str(out), **kw)
  with pytest.raises(build.BuildError, match=f"--out={tmp_path} holds --source={source}"):
    build.build(table(tmp_path, overwrite=True))
  (tmp_path / "x" / "img").mkdir(parents=True)
  with pytest.raises(build.BuildError, match="holds --images_root"):
    build.build(table(tmp_path / "x", images_root=str(tmp_path / "x" / "img"), overwrite=True))
  (tmp_path / "file").write_text("")
  with pytest.raises(build.BuildError, match="is a file, not a folder"):
    build.build(table(tmp_path / "file"))
  (tmp_path / "o").mkdir()  # an empty --out is fine without --overwrite
  build.build(table(tmp_path / "o"))
  assert os.path.exists(tmp_path / "o" / "labels.h5")
