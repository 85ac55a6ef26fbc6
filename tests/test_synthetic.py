import dataclasses
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from linnaeus_jax.data import synthetic

from conftest import ROOT, SMALL


def _arrays(path):
  with h5py.File(path, "r") as h5:
    return {k: h5[k][:] for k in h5.keys() if isinstance(h5[k], h5py.Dataset)}


def test_schema(small_dataset):
  out, paths = small_dataset
  with h5py.File(paths["labels_path"], "r") as h5:
    n = len(h5["img_identifiers"])
    for t in synthetic.TASK_KEYS:
      assert h5[t].dtype == np.uint32 and h5[t].shape == (n,)
    assert h5["spatial"].shape == (n, 3)
    assert list(h5["spatial"].attrs["column_names"]) == ["spatial_x", "spatial_y", "spatial_z"]
    assert h5["temporal"].shape == (n, 2)
    assert list(h5["temporal"].attrs["column_names"]) == ["month_sin", "month_cos"]
    elev = h5[synthetic.ELEVATION_SOURCE]
    assert elev.shape == (n, 2 * len(SMALL.elevation_scales))
    assert list(elev.attrs["column_names"])[:2] == ["elev_100_sin", "elev_100_cos"]
    assert h5["in_region"].dtype == np.uint8
    for raw in ("raw_lat", "raw_lon", "raw_elevation", "raw_date_observed"):
      assert h5[raw].shape == (n,)
    assert "config_json" in h5["metadata"].attrs
    ids = [x.decode() for x in h5["img_identifiers"][:]]
  assert all(os.path.exists(os.path.join(paths["images_dir"], i)) for i in ids)
  img = np.asarray(Image.open(os.path.join(paths["images_dir"], ids[0])))
  assert img.shape == (SMALL.img_size, SMALL.img_size, 3) and img.dtype == np.uint8


def test_encodings_match_closed_forms(small_dataset):
  a = _arrays(small_dataset[1]["labels_path"])
  ok = np.isfinite(a["raw_lat"])
  lat, lon = np.radians(a["raw_lat"][ok]), np.radians(a["raw_lon"][ok])
  np.testing.assert_allclose(a["spatial"][ok, 2], np.sin(lat), atol=1e-5)
  np.testing.assert_allclose(a["spatial"][ok, 0], np.cos(lat) * np.cos(lon), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(a["spatial"][ok], axis=1), 1.0, atol=1e-5)
  assert np.all(a["spatial"][~ok] == 0)  # the original's null form
  e_ok = np.isfinite(a["raw_elevation"])
  np.testing.assert_allclose(a[synthetic.ELEVATION_SOURCE][e_ok, 0],
                             np.sin(2 * np.pi * a["raw_elevation"][e_ok] / 100.0), atol=2e-3)
  assert np.all(a[synthetic.ELEVATION_SOURCE][~e_ok] == np.tile([0, 1], 5))
  month = np.array([int(d[5:7]) for d in a["raw_date_observed"] if d])
  t_ok = np.array([len(d) > 0 for d in a["raw_date_observed"]])
  np.testing.assert_allclose(a["temporal"][t_ok, 0], np.sin(2 * np.pi * month / 12), atol=1e-5)


def test_taxonomy_is_a_tree_and_partial_labels(small_dataset):
  a = _arrays(small_dataset[1]["labels_path"])
  for child, parent in zip(synthetic.TASK_KEYS, synthetic.TASK_KEYS[1:]):
    ok = (a[child] != 0) & (a[parent] != 0)
    pairs = set(zip(a[child][ok], a[parent][ok]))
    assert len({c for c, _ in pairs}) == len(pairs), f"{child} has a multi-parent taxon"
  n_species = (SMALL.num_orders * SMALL.families_per_order * SMALL.genera_per_family
               * SMALL.species_per_genus)
  assert len(np.unique(a["taxa_L10"][a["taxa_L10"] != 0])) == n_species
  null_sp = np.mean(a["taxa_L10"] == 0)
  assert 0.0 < null_sp < 3 * (SMALL.null_species_rate + SMALL.null_genus_rate)
  assert np.all(a["taxa_L20"][a["taxa_L20"] == 0] == a["taxa_L10"][a["taxa_L20"] == 0])
  assert np.all(a["taxa_L30"] != 0) and np.all(a["taxa_L40"] != 0)


def test_zipf_imbalance():
  rng = np.random.default_rng(0)
  opts = dataclasses.replace(SMALL, max_samples_per_species=100, min_samples_per_species=1,
                             zipf_exponent=1.0)
  counts = np.sort(synthetic.species_counts(opts, 8, rng))[::-1]
  np.testing.assert_array_equal(counts, np.round(100 / np.arange(1, 9)))


def test_deterministic_for_a_seed(tmp_path, small_dataset):
  opts = dataclasses.replace(SMALL, max_samples_per_species=12, min_samples_per_species=10)
  p1 = synthetic.generate(str(tmp_path / "a"), opts, verbose=False)
  p2 = synthetic.generate(str(tmp_path / "b"), opts, verbose=False)
  p3 = synthetic.generate(str(tmp_path / "c"), dataclasses.replace(opts, seed=99), verbose=False)
  a1, a2, a3 = (_arrays(p["labels_path"]) for p in (p1, p2, p3))
  for k in a1:
    np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)
  assert not np.array_equal(a1["taxa_L10"], a3["taxa_L10"])
  for name in os.listdir(p1["images_dir"])[:20]:
    with open(os.path.join(p1["images_dir"], name), "rb") as f1, \
        open(os.path.join(p2["images_dir"], name), "rb") as f2:
      assert f1.read() == f2.read()


def test_h5_image_format(tmp_path):
  opts = dataclasses.replace(SMALL, max_samples_per_species=5, min_samples_per_species=5,
                             image_format="h5")
  paths = synthetic.generate(str(tmp_path), opts, verbose=False)
  with h5py.File(paths["images_path"], "r") as h5:
    imgs = h5["images"]
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (32, 32, 3)
    with h5py.File(paths["labels_path"], "r") as lab:
      assert imgs.shape[0] == len(lab["img_identifiers"])


def test_metadata_separates_siblings_that_images_do_not(small_dataset):
  """Within a genus, species are told apart by metadata, not by their (near-identical) look."""
  out, paths = small_dataset
  a = _arrays(paths["labels_path"])
  ids = [x.decode() for x in a["img_identifiers"]]
  keep = (a["taxa_L10"] != 0) & np.isfinite(a["raw_lat"]) & np.isfinite(a["raw_elevation"])
  feats = np.concatenate([a["spatial"], a[synthetic.ELEVATION_SOURCE][:, 4:]], 1)
  meta_acc, img_gap, genus_gap = [], [], []
  for genus in np.unique(a["taxa_L20"][keep]):
    rows = np.flatnonzero(keep & (a["taxa_L20"] == genus))
    species = a["taxa_L10"][rows]
    cents = {s: feats[rows[species == s]].mean(0) for s in np.unique(species)}
    names = list(cents)
    pred = [names[int(np.argmin([np.linalg.norm(feats[r] - cents[s]) for s in names]))]
            for r in rows]
    meta_acc.append(np.mean(np.array(pred) == species))
    mean_img = {s: np.mean([np.asarray(Image.open(os.path.join(paths["images_dir"], ids[r])),
                                       np.float32) for r in rows[species == s][:20]], 0)
                for s in names}
    img_gap.append(np.abs(mean_img[names[0]] - mean_img[names[1]]).mean())
    genus_gap.append(mean_img[names[0]])
  assert np.mean(meta_acc) > 0.9  # nearest centroid on metadata alone
  between_genera = np.mean([np.abs(x - y).mean() for x, y in zip(genus_gap, genus_gap[1:])])
  assert np.mean(img_gap) < 0.5 * between_genera


def test_invalid_options_all_reported():
  bad = dataclasses.replace(SMALL, img_size=8, null_species_rate=1.5, image_format="png")
  with pytest.raises(ValueError) as e:
    bad.validate()
  for needle in ("img_size", "null_species_rate", "image_format"):
    assert needle in str(e.value)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "linnaeus_jax.data.synthetic", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_takes_absl_flags(tmp_path):
  r = _cli(f"--out={tmp_path / 'a'}", "--num_orders=1", "--families_per_order=1",
           "--genera_per_family=2", "--species_per_genus=2", "--max_samples_per_species=3",
           "--min_samples_per_species=3", "--img_size=32", "--elevation_scales=100,2000",
           "--temporal_hours")
  assert r.returncode == 0, r.stderr
  with h5py.File(tmp_path / "a" / "labels.h5", "r") as h5:
    assert len(h5["img_identifiers"]) == 12
    assert h5["temporal"].shape[1] == 4 and h5["elevation_broadrange_2"].shape[1] == 2 * 2
  r = _cli("--helpshort")
  assert "--species_per_genus" in r.stdout and "--[no]temporal_hours" in r.stdout
  for bad, needle in ((["--img_size=x"], "--img_size=x"), (["--elevation_scales=a"], "numbers"),
                      (["--bogus=1"], "bogus"), ([], "--out")):
    r = _cli(*([f"--out={tmp_path / 'b'}"] if bad else []), *bad)
    assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
  assert not (tmp_path / "b").exists()


def test_harder_variants_confuse_pixels_spread_metadata_and_noise_labels(small_dataset, tmp_path):
  """At their defaults the variants change nothing (the fixture's data, its cache folder); set,
  they relabel about label_noise_rate of the rows with another species' whole lineage, redraw
  about pixel_confusion x (1 - 1/siblings) of the images, and widen the spread of lat by
  metadata_spread."""
  opts = dataclasses.replace(SMALL, pixel_confusion=0.5, metadata_spread=2.0,
                             label_noise_rate=0.1)
  assert opts.fingerprint() != SMALL.fingerprint()
  assert SMALL.fingerprint() == dataclasses.replace(SMALL, metadata_spread=1.0).fingerprint()
  synthetic.generate(str(tmp_path), opts, verbose=False)
  with h5py.File(os.path.join(small_dataset[0], "labels.h5")) as a, \
       h5py.File(tmp_path / "labels.h5") as b:
    order_a, order_b = a["taxa_L40"][()], b["taxa_L40"][()]
    fam_a, fam_b = a["taxa_L30"][()], b["taxa_L30"][()]
    n = len(order_a)
    relabelled = np.mean(fam_a != fam_b)  # a random other species is of another family 3/4 times
    assert 0.1 * 0.5 < relabelled < 0.1 * 1.0
    # every relabelled row carries a consistent lineage: its family's order, as elsewhere
    fam_to_order = dict(zip(fam_a, order_a))
    assert all(fam_to_order[f] == o for f, o in zip(fam_b, order_b))
    lat_a, lat_b = a["raw_lat"][()], b["raw_lat"][()]
    species = a["taxa_L10"][()]
    dev = lambda lat: np.nanmean([np.nanstd(lat[species == s]) for s in set(species) - {0}])
    assert 1.6 < dev(lat_b) / dev(lat_a) < 2.4
  names = sorted(os.listdir(os.path.join(small_dataset[0], "images")))
  changed = np.mean([open(os.path.join(small_dataset[0], "images", f), "rb").read()
                     != open(tmp_path / "images" / f, "rb").read() for f in names])
  assert 0.5 * 0.5 * 0.5 < changed < 0.5 * 0.9  # redrawn as itself 1/siblings of the time
  assert n == len(names)


def test_taxa_json_names_every_taxon_consistently_with_the_labels(small_dataset, tmp_path):
  """Every raw id of every rank has a name, and a species' name starts with its genus's name
  (the lineage of the rows); `ensure` adds taxa.json to a dataset made before it existed."""
  import json  # pylint: disable=g-import-not-at-top
  folder, paths = small_dataset
  with open(os.path.join(folder, "taxa.json"), encoding="utf-8") as f:
    taxa = json.load(f)
  with h5py.File(paths["labels_path"], "r") as h5:
    labels = {t: h5[t][:] for t in ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40")}
  for task, ids in labels.items():
    assert {str(int(x)) for x in ids if x} == set(taxa[task]), task
  for s, g in zip(labels["taxa_L10"], labels["taxa_L20"]):
    if s and g:
      genus = taxa["taxa_L20"][str(int(g))]["name"]
      assert taxa["taxa_L10"][str(int(s))]["name"].startswith(genus + " sp. ")
  opts = dataclasses.replace(SMALL, max_samples_per_species=4, min_samples_per_species=2)
  made = synthetic.ensure(opts, str(tmp_path))
  out = os.path.dirname(made["labels_path"])
  before = open(os.path.join(out, "taxa.json")).read()
  os.remove(os.path.join(out, "taxa.json"))
  synthetic.ensure(opts, str(tmp_path))
  assert open(os.path.join(out, "taxa.json")).read() == before
