import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from linnaeus_jax.inference import bundle, export
from linnaeus_jax.inference.predictor import Predictor

from conftest import ROOT

META = {"lat": 45.5, "lon": -73.6, "datetime_utc": "2021-06-01T10:00:00Z", "elevation_m": 30.0}


@pytest.fixture(scope="module")
def bundle_dir(trained_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("b") / "bundle")
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.export", f"--workdir={trained_workdir}",
                      f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"wrote {out}" in r.stdout
  return out


def test_bundle_holds_every_file_and_predicts_like_the_workdir(trained_workdir, bundle_dir):
  assert sorted(os.listdir(bundle_dir)) == sorted(bundle.FILES)
  info = json.load(open(os.path.join(bundle_dir, "bundle.json")))
  assert info["step"] == 20 and info["tasks_coarse_to_fine"][0] == "taxa_L40"
  assert info["switches"] == {"rope_mode": "rotate", "attn_scale": "rsqrt_head_dim",
                              "meta_missing": "learned_token"}
  flat = json.load(open(os.path.join(bundle_dir, "class_index_map.json")))
  c2i = json.load(open(os.path.join(trained_workdir, "assets", "class_to_idx.json")))
  assert flat["taxa_L20"] == {str(i): 0 if k == "null" else int(k)
                              for k, i in sorted(c2i["taxa_L20"].items(), key=lambda x: x[1])}
  a = Predictor.from_workdir(trained_workdir)
  b = Predictor.from_bundle(bundle_dir)
  images = sorted(glob.glob(os.path.join(a.config.data.hybrid.images_dir, "*.jpg")))[:3]
  assert a.predict(images, [META, None, {}]) == b.predict(images, [META, None, {}])


def test_exported_forward_runs_in_a_fresh_process_without_linnaeus_jax(trained_workdir,
                                                                      bundle_dir, tmp_path):
  p = Predictor.from_bundle(bundle_dir)
  images = sorted(glob.glob(os.path.join(p.config.data.hybrid.images_dir, "*.jpg")))[:3]
  images_u8, meta, valid, _, _ = p.preprocess(images, [META, {"lat": 1.0, "lon": 2.0}, None])
  np.savez(tmp_path / "inputs.npz", images=images_u8, valid=valid,
           **{f"meta_{k}": v for k, v in meta.items()})
  script = f"""
import sys, numpy as np, jax
from jax import export
exp = export.deserialize(bytearray(open({bundle_dir!r} + "/model.jax_exported", "rb").read()))
params = dict(np.load({bundle_dir!r} + "/params.npz"))
x = np.load({str(tmp_path / "inputs.npz")!r})
meta = {{k[5:]: x[k] for k in x.files if k.startswith("meta_")}}
logits = exp.call(params, x["images"], meta, x["valid"])
np.savez({str(tmp_path / "logits.npz")!r}, **{{k: np.asarray(v) for k, v in logits.items()}})
assert not any(m.startswith("linnaeus_jax") for m in sys.modules), "linnaeus_jax was imported"
"""
  r = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True,
                     text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(tmp_path / "logits.npz")
  expected = p.probs_batch(images_u8, meta, valid)  # softmax probabilities
  for task, probs in expected.items():
    z = got[task]
    np.testing.assert_allclose(np.exp(z - z.max(-1, keepdims=True)) /
                               np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True),
                               probs, atol=1e-6)
  exported = export.export_forward(p.config, p.variables, p.record, platforms=("cpu",))
  assert "b" in str(exported.in_avals[-1].shape[0])  # a symbolic batch size


def test_a_bundle_with_mean_std_exports_a_forward_that_standardises(bundle_dir, tmp_path):
  b = bundle.read(bundle_dir)
  assert b["preprocessing"]["image"]["mean"] is None  # the run's data.image_mean is ()
  rec = json.loads(json.dumps(b["preprocessing"]))
  rec["image"].update(mean=[0.5, 0.25, 0.125], std=[0.2, 0.4, 0.8])
  exported = export.export_forward(b["config"], b["variables"], rec, platforms=("cpu",))
  out = str(tmp_path / "standardised")
  with open(os.path.join(bundle_dir, "taxonomy.json"), encoding="utf-8") as f:
    taxonomy_json = f.read()
  bundle.write(out, b["config"], b["variables"], rec, b["class_maps"], taxonomy_json, {},
               bytes(exported.serialize()))
  p = Predictor.from_bundle(out)  # read back with the recorded mean/std
  assert p.record["image"]["std"] == [0.2, 0.4, 0.8]
  images = sorted(glob.glob(os.path.join(p.config.data.hybrid.images_dir, "*.jpg")))[:3]
  images_u8, meta, valid, _, _ = p.preprocess(images, [META, None, {"lat": 1.0, "lon": 2.0}])

  def exported_probs(folder):  # as docs/inference.md calls model.jax_exported
    with open(os.path.join(folder, "model.jax_exported"), "rb") as f:
      exp = jax.export.deserialize(bytearray(f.read()))
    logits = exp.call(dict(np.load(os.path.join(folder, "params.npz"))), images_u8, meta, valid)
    return {t: jax.nn.softmax(z, -1) for t, z in logits.items()}
  got, unstandardised = exported_probs(out), exported_probs(bundle_dir)
  # The Predictor standardises as the model was trained (tests/test_predictor.py), and so does
  # the exported forward: the same probabilities, not those of the [0, 1] images.
  for task, probs in p.probs_batch(images_u8, meta, valid).items():
    np.testing.assert_allclose(got[task], probs, atol=1e-6)
  assert max(np.abs(got[t] - unstandardised[t]).max() for t in got) > 1e-3


def test_export_refuses_to_overwrite_and_reports_a_missing_checkpoint(trained_workdir,
                                                                      bundle_dir, tmp_path):
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.export", f"--workdir={trained_workdir}",
                      f"--out={bundle_dir}"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 1 and "exists and is not empty" in r.stderr
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.inference.export",  # the shim's module
                      f"--workdir={trained_workdir}", f"--out={tmp_path / 'x'}", "--step=7"],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 1 and "no checkpoint 7" in r.stderr and "steps: [20]" in r.stderr
  assert not os.path.exists(tmp_path / "x")
