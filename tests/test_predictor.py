import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from linnaeus_jax import config as config_lib, models, preprocessing
from linnaeus_jax.inference import bundle
from linnaeus_jax.inference.predictor import Predictor, consistency_pass
from linnaeus_jax.taxonomy import TaxonomyTree


@pytest.fixture(scope="module")
def predictor(trained_workdir):
  return Predictor.from_workdir(trained_workdir, buckets=(1, 4, 8), consistency="off")


MEAN, STD = (0.5, 0.25, 0.125), (0.2, 0.4, 0.8)


@pytest.fixture(scope="module")
def standardised_workdir(trained_workdir, tmp_path_factory):
  """The trained run, copied, with data.image_mean/std in its config.json and preprocessing.json
  as a run with them writes it (`assets.write`)."""
  workdir = str(tmp_path_factory.mktemp("standardised") / "run")
  shutil.copytree(trained_workdir, workdir)
  path = os.path.join(workdir, "config.json")
  c = config_lib.read_json(path)
  c.data.image_mean, c.data.image_std = MEAN, STD
  with open(path, "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(c))
  with open(os.path.join(workdir, "assets", "preprocessing.json"), "w", encoding="utf-8") as f:
    json.dump(preprocessing.record(c), f, indent=1)
  return workdir


def _model(predictor):
  """The predictor's model with its parameters, to apply by hand."""
  graphdef = nnx.split(nnx.eval_shape(lambda: models.build(predictor.config, nnx.Rngs(0))),
                       nnx.Param, ...)[0]
  return nnx.merge(graphdef, predictor.variables["params"], predictor.variables["buffers"])


def _images(predictor, n):
  return sorted(glob.glob(os.path.join(predictor.config.data.hybrid.images_dir, "*.jpg")))[:n]


def _probs(result, predictor):
  """{task: (C,) probabilities} back from the top-k lists (top_k = C)."""
  out = {}
  for r in result["ranks"]:
    idx = {tid: i for i, tid in predictor.class_maps[r["task"]].items()}
    p = np.zeros(len(idx))
    for tid, prob in r["top_k"]:
      p[idx[tid]] = prob
    out[r["task"]] = p
  return out


META = {"lat": 45.5, "lon": -73.6, "datetime_utc": "2021-06-01T10:00:00Z", "elevation_m": 30.0}


def test_output_equals_the_models_softmax_on_the_same_batch(predictor):
  images = _images(predictor, 3)
  metadata = [META, {"lat": 10.0, "lon": 20.0}, None]
  results = predictor.predict(images, metadata, top_k=100)
  images_u8, meta, valid, _, _ = predictor.preprocess(images, metadata)
  assert predictor.record["image"]["mean"] is None  # trained on [0, 1] images
  logits = _model(predictor)(images_u8 / np.float32(255), meta, valid, train=False)
  assert [r["task"] for r in results[0]["ranks"]] == ["taxa_L40", "taxa_L30", "taxa_L20",
                                                      "taxa_L10"]  # coarse to fine
  for i, res in enumerate(results):
    assert res["error"] is None and res["image"] == images[i]
    got = _probs(res, predictor)
    for t, p in got.items():
      np.testing.assert_allclose(p, jax.nn.softmax(logits[t][i]), atol=1e-6)
      top = res["ranks"][[r["task"] for r in res["ranks"]].index(t)]["top_k"]
      assert [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)


def test_a_run_with_mean_std_predicts_on_the_standardised_image(predictor, standardised_workdir):
  p = Predictor.from_workdir(standardised_workdir, buckets=(1, 4, 8), consistency="off")
  assert p.record["image"]["mean"] == list(MEAN) and p.record["image"]["std"] == list(STD)
  images, metadata = _images(p, 3), [META, None, {"lat": 10.0, "lon": 20.0}]
  results = p.predict(images, metadata, top_k=100)
  images_u8, meta, valid, _, _ = p.preprocess(images, metadata)
  x = (images_u8 / np.float32(255) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
  logits = _model(p)(x, meta, valid, train=False)
  plain = predictor.predict(images, metadata, top_k=100)  # the same weights on [0, 1] images
  for i, res in enumerate(results):
    got, unstandardised = _probs(res, p), _probs(plain[i], predictor)
    for t, probs in got.items():
      np.testing.assert_allclose(probs, jax.nn.softmax(logits[t][i]), atol=1e-6)
    assert max(np.abs(got[t] - unstandardised[t]).max() for t in got) > 1e-3


def test_a_malformed_recorded_mean_std_is_an_error_naming_the_file(standardised_workdir,
                                                                   tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(standardised_workdir, workdir)
  path = os.path.join(workdir, "assets", "preprocessing.json")
  with open(path, encoding="utf-8") as f:
    rec = json.load(f)
  for mean, std, why in [
      (MEAN, [0.2, 0.0, 0.8], "image.std must be positive, got [0.2, 0.0, 0.8]"),
      ([0.5, 0.5], [0.2, 0.2], "image.mean has 2 entries, the model takes 3 channels; "
                               "image.std has 2 entries, the model takes 3 channels")]:
    rec["image"].update(mean=list(mean), std=std)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(rec, f)
    with pytest.raises(bundle.BundleError, match=f"^{re.escape(f'{path}: {why}')}$"):
      Predictor.from_workdir(workdir)


def test_missing_and_invalid_metadata_become_invalid_components(predictor):
  img = _images(predictor, 1) * 5
  md = [META, {**META, "lat": "north"}, {k: v for k, v in META.items() if k != "lat"},
        {**META, "datetime_utc": "June 1st"}, {**META, "lat": 0.0, "lon": 0.0, "elevation_m": 0}]
  _, meta, valid, warnings, _ = predictor.preprocess(img, md)
  names = [c["name"] for c in predictor.layout]
  s, t = names.index("SPATIAL"), names.index("TEMPORAL")
  assert valid[0].all() and warnings[0] == []
  assert not valid[1, s] and warnings[1] == ["SPATIAL invalid: lat/lon not numbers: 'north', -73.6"]
  assert not valid[2, s] and warnings[2] == ["SPATIAL invalid: lat/lon missing"]
  assert not valid[3, t] and "datetime_utc not ISO 8601" in warnings[3][0]
  assert valid[4].all() and warnings[4] == []  # the equator, sea level: real values
  np.testing.assert_allclose(meta["SPATIAL"][4], [1.0, 0.0, 0.0], atol=1e-7)
  np.testing.assert_array_equal(meta["SPATIAL"][1], 0.0)
  # An invalid value predicts exactly as an absent one; a valid one changes the prediction.
  res = predictor.predict(img[:3], md[:3], top_k=100)
  p = [_probs(r, predictor) for r in res]
  for task in p[0]:
    np.testing.assert_array_equal(p[1][task], p[2][task])
  assert any(np.abs(p[0][t] - p[1][t]).max() > 1e-4 for t in p[0])


def test_a_malformed_image_is_that_samples_error(predictor, tmp_path):
  good = _images(predictor, 2)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not really a jpeg")
  res = predictor.predict([good[0], str(broken), str(tmp_path / "missing.jpg"), b"junk",
                           good[1]], [META] * 5)
  assert [r["error"] is None for r in res] == [True, False, False, False, True]
  assert "image could not be read" in res[1]["error"] and res[1]["ranks"] == []
  assert "No such file" in res[2]["error"]
  alone = predictor.predict([good[1]], [META])[0]  # a batch of 1, not 2 padded to 4
  for a, b in zip(res[4]["ranks"], alone["ranks"]):
    assert [x[0] for x in a["top_k"]] == [x[0] for x in b["top_k"]]
    np.testing.assert_allclose([x[1] for x in a["top_k"]], [x[1] for x in b["top_k"]], atol=1e-5)


def test_requests_are_padded_to_buckets_without_recompiling(trained_workdir):
  p = Predictor.from_workdir(trained_workdir, buckets=(1, 4, 8))
  images = _images(p, 9)
  for n in (1, 2, 3, 4, 1, 5, 8, 9, 7):
    assert len(p.predict(images[:n])) == n
  assert p.compiles == 3  # one trace per bucket: 1, 4 and 8 (9 = 8 + 1)
  assert [p.bucket(n) for n in (1, 2, 4, 5, 8, 20)] == [1, 4, 4, 8, 8, 8]


def _tree():
  """Finest first: 4 species -> 2 genera -> 2 families; index 0 is the null class."""
  return TaxonomyTree(["taxa_L10", "taxa_L20", "taxa_L30"],
                      {"taxa_L10": 5, "taxa_L20": 3, "taxa_L30": 3},
                      {"taxa_L10": np.array([-1, 1, 1, 2, 2], np.int32),
                       "taxa_L20": np.array([-1, 1, 2], np.int32)})


COARSE_TO_FINE = ["taxa_L30", "taxa_L20", "taxa_L10"]


@pytest.mark.parametrize("tops,null_class,mode,expected", [
    ([1, 1, 2], True, "ancestor", ["keep", "keep", "keep"]),      # family 1 > genus 1 > sp 2
    ([1, 2, 3], True, "ancestor", ["keep", "null", "null"]),      # genus 2 is in family 2
    ([1, 1, 3], True, "ancestor", ["keep", "keep", "null"]),      # species 3 is in genus 2
    ([1, 2, 3], False, "ancestor", ["keep", "omit", "omit"]),     # no null class: omitted
    ([0, 1, 1], True, "ancestor", ["keep", "null", "null"]),      # a null family nulls below
    ([2, 2, 4], True, "off", ["keep", "keep", "keep"]),
    ([1, 1, 2], True, "original", ["keep", "keep", "keep"]),
    ([1, 2, 1], True, "original", ["keep", "null", "null"]),
])
def test_consistency_rule_on_hand_made_cases(tops, null_class, mode, expected):
  assert consistency_pass(COARSE_TO_FINE, tops, _tree(), null_class, mode) == expected


def test_consistency_across_skipped_and_unknown_ranks():
  # Family then species, genus not predicted: ours checks the ancestor two levels up; the
  # original's rule wants a direct parent and nulls the species.
  tasks = ["taxa_L30", "taxa_L10"]
  assert consistency_pass(tasks, [2, 3], _tree(), True, "ancestor") == ["keep", "keep"]
  assert consistency_pass(tasks, [1, 3], _tree(), True, "ancestor") == ["keep", "null"]
  assert consistency_pass(tasks, [2, 3], _tree(), True, "original") == ["keep", "null"]
  # A rank the taxonomy does not know is kept and does not break the chain below it.
  tasks = ["taxa_L30", "taxa_L25", "taxa_L10"]
  assert consistency_pass(tasks, [2, 0, 3], _tree(), True, "ancestor") == ["keep", "keep",
                                                                          "keep"]
  assert consistency_pass(tasks, [2, 0, 3], _tree(), True, "original") == ["keep", "null",
                                                                           "null"]
