import json
import os

import h5py
import numpy as np
import pytest

from linnaeus_jax import config as config_lib
from linnaeus_jax.data import labels

from conftest import tiny_config


def _write(path, **cols):
  """A hand-made labels.h5: every keyword is a dataset."""
  with h5py.File(path, "w") as h5:
    for k, v in cols.items():
      if isinstance(v, (list, np.ndarray)) and len(v) and isinstance(v[0], str):
        h5.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
      else:
        h5.create_dataset(k, data=np.asarray(v))
  return str(path)


def _hand_config(path, partial=True, **data):
  c = config_lib.base_config()
  c.data.h5.labels_path = path
  c.data.hybrid.use_hybrid = True
  c.data.hybrid.images_dir = os.path.dirname(path)  # exists; no image is read
  c.data.task_keys_h5 = ["taxa_L10", "taxa_L20"]
  c.model.classification.heads = {"taxa_L10": dict(type="Linear", num_classes=0),
                                  "taxa_L20": dict(type="Linear", num_classes=0)}
  c.data.partial.levels = partial
  c.data.meta.components.TEMPORAL.enabled = False
  c.data.h5.train_val_split_ratio = 1.0
  for k, v in data.items():
    c.data[k] = v
  return c


SPECIES = np.array([30, 10, 0, 20, 10, 0], np.uint32)
GENUS = np.array([7, 5, 5, 0, 5, 0], np.uint32)  # 10, 20 -> 5 ... 30 -> 7; row 5 all-null


def test_class_maps_and_filters_by_hand(tmp_path):
  path = _write(tmp_path / "l.h5", img_identifiers=[f"{i}.jpg" for i in range(6)],
                taxa_L10=SPECIES, taxa_L20=GENUS, spatial=np.ones((6, 3), np.float32))
  d = labels.load(_hand_config(path))
  assert d.class_to_idx["taxa_L10"] == {"null": 0, 10: 1, 20: 2, 30: 3}
  assert d.class_to_idx["taxa_L20"] == {"null": 0, 5: 1, 7: 2}
  assert {k: v for k, v in d.dropped.items() if v} == {"all_null": 1}
  order = np.argsort(d.train.raw_row)
  np.testing.assert_array_equal(d.train.raw_row[order], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(d.train.labels[order], [[3, 2], [1, 1], [0, 1], [2, 0], [1, 1]])
  # Without partial levels, any null drops the row and class 0 is a real taxon.
  d = labels.load(_hand_config(path, partial=False))
  assert d.class_to_idx["taxa_L10"] == {10: 0, 20: 1, 30: 2}
  assert {k: v for k, v in d.dropped.items() if v} == {"all_null": 1, "any_null": 2}
  np.testing.assert_array_equal(np.sort(d.train.raw_row), [0, 1, 4])
  # Upward-major: nulls are allowed only above the highest labelled rank (row 2: genus, no species).
  d = labels.load(_hand_config(path, upward_major_check=True))
  assert d.dropped["upward_major"] == 1
  assert 2 not in set(d.train.raw_row)
  assert 3 in set(d.train.raw_row)  # species known, genus unknown: kept


def test_hierarchy_and_multi_parent_error(tmp_path):
  path = _write(tmp_path / "l.h5", img_identifiers=[f"{i}.jpg" for i in range(6)],
                taxa_L10=SPECIES, taxa_L20=GENUS, spatial=np.ones((6, 3), np.float32))
  assert labels.load(_hand_config(path)).taxonomy.hierarchy_map() == {"taxa_L10": {1: 1, 3: 2}}
  bad = _write(tmp_path / "bad.h5", img_identifiers=["a", "b"], taxa_L10=np.array([10, 10]),
               taxa_L20=np.array([5, 7]), spatial=np.ones((2, 3), np.float32))
  with pytest.raises(labels.DataError, match=r"taxon 10 \(taxa_L10\) has several parents .*\[5, 7\]"):
    labels.load(_hand_config(bad))
  # Majority resolution keeps the most frequent parent, with a warning.
  major = _write(tmp_path / "major.h5", img_identifiers=["a", "b", "c"],
                 taxa_L10=np.array([10, 10, 10]), taxa_L20=np.array([5, 7, 7]),
                 spatial=np.ones((3, 3), np.float32))
  c = _hand_config(major)
  c.data.taxonomy.multi_parent = "majority"
  d = labels.load(c)
  assert d.taxonomy.hierarchy_map() == {"taxa_L10": {1: 2}} and d.class_to_idx["taxa_L20"][7] == 2
  # A taxonomy_tree.json given explicitly replaces the co-occurrence links.
  tree = tmp_path / "taxonomy_tree.json"
  tree.write_text(d.taxonomy.to_json().replace('"1": 2', '"1": 1'))
  c.data.taxonomy.path = str(tree)
  assert labels.load(c).taxonomy.hierarchy_map() == {"taxa_L10": {1: 1}}


def test_schema_problems_listed_together(tmp_path):
  path = _write(tmp_path / "l.h5", img_identifiers=["a", "b"], taxa_L10=np.array([1, 2]),
                spatial=np.ones((2, 4), np.float32))
  c = _hand_config(path)
  c.data.meta.components.TEMPORAL.enabled = True
  with pytest.raises(labels.DataError) as e:
    labels.load(c)
  msg = str(e.value)
  assert "missing task dataset 'taxa_L20'" in msg
  assert "missing source dataset 'temporal' of component TEMPORAL" in msg
  assert "spatial has width 4 but component SPATIAL has dim 3" in msg


def test_validity_sources_in_order_of_preference(tmp_path):
  elev_null = np.tile([0.0, 1.0], 5)
  elev = np.stack([elev_null, np.full(10, 0.5), elev_null]).astype(np.float32)
  common = dict(img_identifiers=["a", "b", "c"], taxa_L10=np.array([1, 2, 3]),
                taxa_L20=np.array([9, 9, 9]), spatial=np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1]],
                                                                 np.float32),
                elevation_broadrange_2=elev)

  def load(**extra):
    c = _hand_config(_write(tmp_path / f"{len(extra)}.h5", **common, **extra))
    c.data.meta.components.ELEVATION.enabled = True
    table = labels.load(c).train
    return table.take(np.argsort(table.raw_row))
  # Value rules: all-zero spatial and the [0,1,...] elevation pattern count as missing.
  t = load()
  np.testing.assert_array_equal(t.meta_valid, [[False, False], [True, True], [True, False]])
  # Raw columns win over values: a real 0 m elevation is valid, a NaN latitude is not.
  t = load(raw_lat=np.array([0.0, np.nan, 10.0], np.float32),
           raw_lon=np.array([0.0, 1.0, 2.0], np.float32),
           raw_elevation=np.array([0.0, 5.0, np.nan], np.float32))
  np.testing.assert_array_equal(t.meta_valid, [[True, True], [False, True], [True, False]])
  assert np.all(t.meta["SPATIAL"][1] == 0)  # invalid values are zeroed
  # An explicit <source>_valid dataset wins over everything.
  t = load(raw_lat=np.array([0.0, np.nan, 10.0], np.float32),
           raw_lon=np.array([0.0, 1.0, 2.0], np.float32),
           spatial_valid=np.array([0, 1, 1], np.uint8))
  np.testing.assert_array_equal(t.meta_valid[:, 0], [False, True, True])
  # TEMPORAL: an empty raw_date_observed string is missing, whatever the encoded value.
  c = _hand_config(_write(tmp_path / "t.h5", **common, temporal=np.ones((3, 2), np.float32),
                          raw_date_observed=["2020-05-01", "", "2021-01-09"]))
  c.data.meta.components.TEMPORAL.enabled = True
  table = labels.load(c).train
  table = table.take(np.argsort(table.raw_row))
  np.testing.assert_array_equal(table.meta_valid[:, 0], [True, False, True])
  np.testing.assert_array_equal(table.meta["TEMPORAL"][1], [0, 0])


def test_out_of_region_and_oor_mask(small_dataset):
  c = tiny_config(small_dataset[0])
  with h5py.File(c.data.h5.labels_path, "r") as h5:
    in_region = h5["in_region"][:].astype(bool)
  c.data.h5.train_val_split_ratio = 1.0
  all_rows = labels.load(c)
  assert len(all_rows.train) == len(in_region)
  c.data.out_of_region.include = False
  d = labels.load(c)
  assert d.dropped["out_of_region"] == int((~in_region).sum())
  assert in_region[d.train.raw_row].all()
  c.data.out_of_region.include = True
  c.data.meta.components.SPATIAL.oor_mask = True
  d = labels.load(c)
  spatial = [n for n, _ in d.components].index("SPATIAL")
  assert not d.train.meta_valid[~in_region[d.train.raw_row], spatial].any()


def test_single_file_split_is_the_original_random_state_split(small_dataset):
  c = tiny_config(small_dataset[0])
  d = labels.load(c)
  n = len(d.train) + len(d.val)
  perm = np.random.RandomState(42).permutation(n)
  n_train = int(n * 0.9)
  np.testing.assert_array_equal(d.train.raw_row, np.sort(perm[:n_train]))  # nothing filtered
  np.testing.assert_array_equal(d.val.raw_row, np.sort(perm[n_train:]))
  assert d.num_classes["taxa_L10"] == 17 and d.num_classes["taxa_L40"] == 3


def test_more_schema_errors(tmp_path):
  path = _write(tmp_path / "l.h5", img_identifiers=["a", "b"], taxa_L10=np.array([1.5, 2.0]),
                taxa_L20=np.array([1, 1]), spatial=np.ones((3, 3), np.float32))
  with pytest.raises(labels.DataError) as e:
    labels.load(_hand_config(path))
  assert "taxa_L10 has dtype float64, expected integer" in str(e.value)
  assert "spatial has 3 rows, expected 2" in str(e.value)
  no_ids = _write(tmp_path / "n.h5", taxa_L10=np.array([1]), taxa_L20=np.array([1]))
  with pytest.raises(labels.DataError, match="missing dataset 'img_identifiers'"):
    labels.load(_hand_config(no_ids))
  cols = _write(tmp_path / "c.h5", img_identifiers=["a"], taxa_L10=np.array([1]),
                taxa_L20=np.array([1]), spatial=np.ones((1, 3), np.float32))
  c = _hand_config(cols)
  c.data.meta.components.SPATIAL.columns = ["x", "y", "z"]
  with pytest.raises(labels.DataError, match=r"columns \['x', 'y', 'z'\] of component SPATIAL"):
    labels.load(c)
  with pytest.raises(labels.DataError, match="cannot open labels file"):
    labels.load(_hand_config(str(tmp_path / "nope.h5")))
  empty = _write(tmp_path / "e.h5", img_identifiers=["a"], taxa_L10=np.array([0]),
                 taxa_L20=np.array([0]), spatial=np.ones((1, 3), np.float32))
  with pytest.raises(labels.DataError, match="no training rows survive"):
    labels.load(_hand_config(empty))


def test_missing_meta_filter(tmp_path):
  path = _write(tmp_path / "l.h5", img_identifiers=["a", "b", "c"], taxa_L10=np.array([1, 2, 3]),
                taxa_L20=np.array([9, 9, 9]),
                spatial=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32))
  c = _hand_config(path)
  c.data.meta.components.SPATIAL.allow_missing = False
  d = labels.load(c)
  assert d.dropped["missing_meta"] == 1 and sorted(d.train.raw_row) == [1, 2]


def _subset(src, dst, rows):
  """A copy of labels file `src` with only `rows` (every per-row dataset), attributes kept."""
  with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
    n = len(a["img_identifiers"])
    for k, ds in a.items():
      if isinstance(ds, h5py.Dataset) and ds.shape and ds.shape[0] == n:
        b.create_dataset(k, data=ds[:][rows], dtype=ds.dtype)
        b[k].attrs.update(dict(ds.attrs))
  return str(dst)


def test_two_file_mode(small_dataset, tmp_path):
  out, paths = small_dataset
  with h5py.File(paths["labels_path"], "r") as h5:
    species = h5["taxa_L10"][:]
    ids = h5["img_identifiers"][:]
  only_val = np.unique(species[species > 0])[-1]  # a species present only in the val file
  train_rows = np.flatnonzero((species != only_val) & (np.arange(len(species)) % 3 != 0))
  val_rows = np.setdiff1d(np.arange(len(species)), train_rows)
  c = tiny_config(out)
  c.data.h5.labels_path = ""
  c.data.h5.train_labels_path = _subset(paths["labels_path"], tmp_path / "t.h5", train_rows)
  c.data.h5.val_labels_path = _subset(paths["labels_path"], tmp_path / "v.h5", val_rows)
  c.data.h5.train_images_path = c.data.h5.val_images_path = paths["images_dir"]
  d = labels.load(c)
  assert (len(d.train), len(d.val), d.rows_total) == (len(train_rows), len(val_rows),
                                                       len(species))  # whole files, no split
  np.testing.assert_array_equal(d.train.image_id, ids[train_rows][d.train.raw_row])
  np.testing.assert_array_equal(d.val.image_id, ids[val_rows][d.val.raw_row])
  cls = d.class_to_idx["taxa_L10"][int(only_val)]  # class maps: the union of both files
  assert cls == d.num_classes["taxa_L10"] - 1
  assert not (d.train.labels[:, 0] == cls).any()
  assert (d.val.labels[:, 0] == cls).sum() == (species[val_rows] == only_val).sum()
  # Train file only: an empty validation set.
  c.data.h5.val_labels_path = ""
  assert len(labels.load(c).val) == 0


def test_file_scenarios_and_image_locations_are_checked(small_dataset, tmp_path):
  out, paths = small_dataset
  c = tiny_config(out)
  c.data.h5.train_labels_path = paths["labels_path"]  # labels_path is set too
  c.data.hybrid.images_dir = str(tmp_path / "absent")
  with pytest.raises(labels.DataError) as e:
    labels.load(c)
  assert "both data.h5.labels_path" in str(e.value)
  assert f"images folder {tmp_path / 'absent'} does not exist" in str(e.value)
  c = tiny_config(out)
  c.data.h5.val_labels_path = paths["labels_path"]
  with pytest.raises(labels.DataError, match="val_labels_path is set without"):
    labels.load(c)
  # images.h5 problems: missing file, missing dataset, wrong dtype, shape and row count.
  c = tiny_config(out)
  c.data.hybrid.use_hybrid = False
  c.data.h5.images_path = str(tmp_path / "none.h5")
  with pytest.raises(labels.DataError, match="cannot open images file"):
    labels.load(c)
  with h5py.File(tmp_path / "empty.h5", "w"):
    pass
  c.data.h5.images_path = str(tmp_path / "empty.h5")
  with pytest.raises(labels.DataError, match="missing dataset 'images'"):
    labels.load(c)
  with h5py.File(tmp_path / "bad.h5", "w") as h5:
    h5["images"] = np.zeros((3, 8, 8), np.float32)
  c.data.h5.images_path = str(tmp_path / "bad.h5")
  with pytest.raises(labels.DataError) as e:
    labels.load(c)
  assert "expected (N, H, W, 3)" in str(e.value) and "expected uint8" in str(e.value)
  assert "images has 3 rows but the labels file has" in str(e.value)


def _skip_missing(small_dataset, tmp_path, n_missing):
  """A copy of the image folder without its first `n_missing` files; config with policy skip."""
  import shutil
  out, paths = small_dataset
  folder = tmp_path / "imgs"
  shutil.copytree(paths["images_dir"], folder)
  gone = sorted(folder.iterdir())[:n_missing]
  for f in gone:
    f.unlink()
  c = tiny_config(out)
  c.data.hybrid.images_dir = str(folder)
  c.data.hybrid.missing_image_policy = "skip"
  return c, gone


def test_split_rows_and_missing_image_report_are_written(small_dataset, tmp_path):
  from linnaeus_jax import assets
  c, gone = _skip_missing(small_dataset, tmp_path, 2)
  d = labels.load(c)
  assets.write(str(tmp_path / "run"), c, d)
  split = np.load(tmp_path / "run" / "assets" / "split_rows.npz")
  np.testing.assert_array_equal(split["train"], d.train.raw_row)
  np.testing.assert_array_equal(split["val"], d.val.raw_row)
  with open(tmp_path / "run" / "assets" / "missing_images.json") as f:
    report = json.load(f)
  assert sorted(report["all"]) == sorted(x.name for x in gone)


def test_skip_policy_excludes_missing_images_up_front(small_dataset, tmp_path):
  c, gone = _skip_missing(small_dataset, tmp_path, 3)
  d = labels.load(c)
  assert d.dropped["missing_image"] == 3
  assert sorted(d.missing_images["all"]) == sorted(f.name for f in gone)
  used = {x.decode() for x in np.concatenate([d.train.image_id, d.val.image_id])}
  assert not used & {f.name for f in gone}
  c.data.hybrid.missing_image_policy = "error"
  c.data.hybrid.verify_images.enabled = True
  with pytest.raises(FileNotFoundError, match="3 of .* images missing"):
    labels.load(c)


def test_taxon_names_from_the_builders_taxa_json(tmp_path):
  """taxa.json beside the labels file ({task: {raw id: {"name": ...}}}) names the classes;
  the null class is 'null', a taxon without a name its raw id; without the file, no names."""
  from linnaeus_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path / "l.h5", img_identifiers=[f"{i}.jpg" for i in range(6)],
                taxa_L10=SPECIES, taxa_L20=GENUS, spatial=np.ones((6, 3), np.float32))
  d = labels.load(_hand_config(path))
  assert d.taxon_names == {} and "taxon_names.json" not in d.assets()
  assert [d.name("taxa_L10", i) for i in range(4)] == ["null", "10", "20", "30"]
  taxa = {"taxa_L10": {"10": {"name": "Quercus alba", "rank": "species"},
                       "30": {"name": "Fagus grandifolia"}, "99": {"name": "not in the data"}},
          "taxa_L20": {"5": {"name": "Quercus"}, "7": {"id_given": True}},  # 7: no name
          "taxa_L30": {"1": {"name": "Fagaceae"}}}  # not a task of this config
  (tmp_path / "taxa.json").write_text(json.dumps(taxa))
  d = labels.load(_hand_config(path))
  assert d.taxon_names == {"taxa_L10": {"10": "Quercus alba", "30": "Fagus grandifolia",
                                        "99": "not in the data"},
                           "taxa_L20": {"5": "Quercus"}}
  # class_to_idx: taxa_L10 {null: 0, 10: 1, 20: 2, 30: 3}, taxa_L20 {null: 0, 5: 1, 7: 2}
  assert [d.name("taxa_L10", i) for i in range(4)] == ["null", "Quercus alba", "20",
                                                      "Fagus grandifolia"]
  assert [d.name("taxa_L20", i) for i in range(3)] == ["null", "Quercus", "7"]
  assert json.loads(d.assets()["taxon_names.json"]) == d.taxon_names
  counts = {t: np.zeros((3, d.num_classes[t]), np.int64) for t in d.task_keys}
  rows = evaluate.per_class_rows(counts, d)  # the names the reports and plots show
  assert [r["name"] for r in rows["taxa_L10"]] == ["null", "Quercus alba", "20",
                                                   "Fagus grandifolia"]
  assert [(r["taxon_id"], r["name"]) for r in rows["taxa_L20"]] == [(0, "null"), (5, "Quercus"),
                                                                     (7, "7")]
