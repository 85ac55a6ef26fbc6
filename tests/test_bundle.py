import json
import os
import shutil

import numpy as np
import pytest
import yaml

from linnaeus_jax import preprocessing
from linnaeus_jax.inference import bundle
from linnaeus_jax.inference.predictor import Predictor, load_workdir
from linnaeus_jax.tools import convert_torch

from conftest import tiny_config


def test_params_round_trip_keeps_int_keys_and_empty_trees(tmp_path):
  v = {"params": {"stage": {"blocks": {0: {"w": np.arange(3.0)}, 1: {"w": np.ones(2)}}},
                  "head": {"b": np.float32(2.0)}}, "buffers": {}}
  bundle.save_params(str(tmp_path / "p.npz"), v)
  back = bundle.load_params(str(tmp_path / "p.npz"))
  assert back["buffers"] == {} and sorted(back["params"]["stage"]["blocks"]) == [0, 1]
  np.testing.assert_array_equal(back["params"]["stage"]["blocks"][0]["w"], np.arange(3.0))
  assert os.listdir(tmp_path) == ["p.npz"]  # no temporary file left


def test_check_record_takes_mean_std_or_none_and_names_a_malformed_one(small_dataset):
  c = tiny_config(small_dataset[0])
  rec = preprocessing.record(c)
  path = "/b/preprocessing.json"
  bundle.check_record(rec, c, path)  # null: images in [0, 1]
  image = rec["image"]
  bundle.check_record({**rec, "image": {"size": image["size"]}}, c, path)  # absent: the same
  with_stats = lambda mean, std: {**rec, "image": {**image, "mean": mean, "std": std}}
  bundle.check_record(with_stats([0.5, 0.25, 0], [0.2, 0.4, 1]), c, path)
  for mean, std, why in [
      ([0.5, 0.5], [0.2, 0.2], "image.mean has 2 entries, the model takes 3 channels"),
      ([0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], "image.std has 4 entries, the model takes 3"),
      ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2], r"image.std must be positive, got \[0.2, 0.0, 0.2\]"),
      ([0.5, 0.5, 0.5], [0.2, -1, 0.2], "image.std must be positive"),
      ([0.5, 0.5, 0.5], None, "image.mean and image.std must be both null or both lists"),
      ("imagenet", [0.2, 0.2, 0.2], "image.mean must be null or a list of 3 numbers, got 'imag"),
      ([0.5, "a", 0.5], [0.2, 0.2, 0.2], "image.mean must be null or a list of 3 numbers"),
      ([0.5, 0.5, 0.5], [0.2, float("nan"), 0.2], "image.std must be null or a list of 3"),
      ([0.5, 0.5, True], [0.2, 0.2, 0.2], "image.mean must be null or a list of 3"),
      ([0.5, 0.5, 10 ** 400], [0.2, 0.2, 0.2], "image.mean must be null or a list of 3")]:
    with pytest.raises(bundle.BundleError, match=f"^{path}: {why}"):
      bundle.check_record(with_stats(mean, std), c, path)


@pytest.fixture(scope="module")
def original_bundle(trained_workdir, tmp_path_factory):
  """An original-format bundle folder plus our params converted from a torch-named state dict."""
  root = tmp_path_factory.mktemp("orig")
  w = load_workdir(trained_workdir)
  state = convert_torch.to_torch(w["variables"], w["config"])
  np.savez(root / "pytorch_model.npz", **state)
  convert_torch.run(str(root / "pytorch_model.npz"),
                    os.path.join(trained_workdir, "config.json"), str(root / "converted"))
  orig = root / "bundle"
  orig.mkdir()
  shutil.copy(os.path.join(trained_workdir, "assets", "taxonomy_tree.json"),
              orig / "taxonomy.json")
  (orig / "class_index_map.json").write_text(json.dumps(bundle.class_index_map(w["class_maps"])))
  scales = next(c["scales"] for c in w["preprocessing"]["metadata"] if c["name"] == "ELEVATION")
  (orig / "inference_config.yaml").write_text(yaml.safe_dump({
      "model": {"architecture_name": "mFormerV1_sm", "weights_path": "pytorch_model.bin"},
      "metadata_preprocessing": {"use_geolocation": True, "use_temporal": True,
                                 "temporal_use_julian_day": False, "temporal_use_hour": False,
                                 "use_elevation": True, "elevation_scales": scales}}))
  return w, str(orig), str(root / "converted")


def test_an_original_bundle_with_converted_params_predicts(original_bundle):
  w, orig, converted = original_bundle
  p = Predictor.from_bundle(orig, params=converted)
  assert p.config.model.rope_mode == "cos_only" and p.config.model.meta_missing == "zeros"
  # The original trained on [0, 1] images: no mean/std.
  assert p.record["image"]["mean"] is None and p.record["image"]["std"] is None
  # The metadata layout built from inference_config.yaml is the one recorded at training.
  assert p.layout == [{k: c[k] for k in c} for c in w["preprocessing"]["metadata"]]
  res = p.predict([np.full((40, 50, 3), 128, np.uint8)],
                  [{"lat": 1.0, "lon": 2.0, "datetime_utc": "2020-02-03", "elevation_m": 5}])
  assert res[0]["error"] is None and not res[0]["warnings"]
  ids = {t: set(m.values()) for t, m in w["class_maps"].items()}
  for r in res[0]["ranks"]:
    assert {tid for tid, _ in r["top_k"]} <= ids[r["task"]]


def test_bad_bundles_name_their_problems(original_bundle, tmp_path):
  w, orig, converted = original_bundle
  with pytest.raises(bundle.BundleError, match="needs params="):
    bundle.read(orig)
  broken = tmp_path / "broken"
  shutil.copytree(orig, broken)
  flat = json.load(open(broken / "class_index_map.json"))
  del flat["taxa_L20"]
  flat["taxa_L10"]["999"] = 5
  (broken / "class_index_map.json").write_text(json.dumps(flat))
  with pytest.raises(bundle.BundleError) as e:
    bundle.read(str(broken), converted)
  assert "no task taxa_L20" in str(e.value) and "indices [999] out of range" in str(e.value)
  (broken / "class_index_map.json").write_text("{not json")
  with pytest.raises(bundle.BundleError, match="class_index_map.json is not valid JSON"):
    bundle.read(str(broken), converted)
  with pytest.raises(bundle.BundleError, match="not found"):
    bundle.read(str(tmp_path / "nowhere"))
