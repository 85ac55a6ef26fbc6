"""The user's journey end to end, with the commands a user types, on an iNaturalist-2021-layout
dataset this test makes (tests/inat_layout.py: nested folders, a truncated, a zero-byte, a CMYK,
a greyscale and a PNG-named-.jpg photo, and the 8 EXIF orientations):
build (decode check; packed shards) -> two-file training validating on labels_val.h5 ->
evaluate -> export -> predict on nested folders -> serve. EXIF-rotated photos reach the model as
their upright twins in training, predict and serve.
"""

import base64
import glob
import json
import os
import socket
import subprocess
import sys
import time

import h5py
import httpx
import numpy as np
import pytest

import inat_layout
from conftest import ROOT
from linnaeus_jax import preprocessing
from linnaeus_jax.data import images as images_lib

pytestmark = pytest.mark.slow

# A JPEG (quality 95, 4:2:0) against its lossless upright twin, both squashed to the model's
# size: mean absolute difference in levels. Measured: 2.1-3.9 (orientation 1 alone: 2.9); any
# wrong turn or flip of these pictures: 17 or more.
JPEG_TOLERANCE = 5.0
SIZE = 32


def cli(*args, ok=True, timeout=900):
  """Runs `python -m <args>` as a user would; returns the completed process."""
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if ok:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  return proc


def build(root, out, *flags):
  return cli("linnaeus_jax.data.build", "--format=inat", f"--source={root}/train.json",
             f"--val_source={root}/val.json", f"--images_root={root}", f"--out={out}",
             "--check_images", "--on_bad_row=drop", "--noprogress", *flags)


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
  """The dataset, its two builds, and a two-file run trained on the folder build."""
  root = str(tmp_path_factory.mktemp("inat"))
  made = inat_layout.make(root)
  build(root, f"{root}/built")
  build(root, f"{root}/packed", "--pack_images", "--max_side=48")
  workdir = f"{root}/run"
  train = cli("linnaeus_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
              "--config.data.synthetic.enabled=False",
              f"--config.data.h5.train_labels_path={root}/built/labels.h5",
              f"--config.data.h5.val_labels_path={root}/built/labels_val.h5",
              "--config.data.hybrid.use_hybrid=True", f"--config.data.hybrid.images_dir={root}",
              "--config.data.meta.components.ELEVATION.enabled=False",
              "--config.data.meta.components.TEMPORAL.dim=4", f"--config.data.img_size={SIZE}",
              "--config.train.steps=12", "--config.data.batch_size=16",
              "--config.data.batch_size_val=32", "--config.schedule.validation.interval_steps=6",
              "--config.schedule.validation.mask_meta_interval_steps=6",
              "--config.schedule.checkpoint.interval_steps=6")
  return {"root": root, "made": made, "workdir": workdir, "train_out": train.stdout}


def _report(path):
  with open(os.path.join(path, "build_report.json"), encoding="utf-8") as f:
    return json.load(f)


def test_the_build_drops_exactly_the_undecodable_photos_with_reasons(journey):
  root, made = journey["root"], journey["made"]
  for out in ("built", "packed"):
    report = _report(f"{root}/{out}")
    dropped = {r["image"]: r["detail"] for r in report["dropped_rows"]}
    assert set(dropped) == set(made["undecodable"]), out
    assert dropped[made["undecodable"][0]].startswith("image unreadable: truncated")
    assert dropped[made["undecodable"][1]] == "image unreadable: zero-byte file"
    assert report["splits"]["train"]["rows_written"] == len(made["train"]) - 2
    assert report["splits"]["val"]["rows_written"] == len(made["val"])
  packed = sorted(os.path.basename(p) for p in glob.glob(f"{root}/packed/images*.h5"))
  assert packed and any(p.startswith("images_val") for p in packed)


def test_a_second_build_into_the_same_out_is_refused_and_overwrite_replaces_it(journey):
  root = journey["root"]
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{root}/packed/*")}
  proc = cli(
      "linnaeus_jax.data.build", "--format=inat", f"--source={root}/train.json",
      f"--images_root={root}", f"--out={root}/packed", "--noprogress", ok=False)
  assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith(f"error: --out {root}/packed is not empty")
  assert {p: os.path.getmtime(p) for p in glob.glob(f"{root}/packed/*")} == before
  out = f"{root}/rebuilt"
  build(root, out, "--pack_images")
  cli("linnaeus_jax.data.build", "--format=inat", f"--source={root}/train.json",
      f"--images_root={root}", f"--out={out}", "--noprogress", "--overwrite")
  assert sorted(os.listdir(out)) == ["build_report.json", "labels.h5", "taxa.json",
                                     "taxonomy_tree.json"]


def test_two_file_training_validates_on_the_val_file_and_reads_as_a_person_would(journey):
  root, workdir, out = journey["root"], journey["workdir"], journey["train_out"]
  with open(f"{workdir}/assets/data_summary.json", encoding="utf-8") as f:
    rows = json.load(f)["rows"]
  report = _report(f"{root}/built")
  assert rows["train"] == report["splits"]["train"]["rows_written"]
  assert rows["val"] == report["splits"]["val"]["rows_written"]
  with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  val = [r for r in records if r["phase"] == "val"]
  assert [r["step"] for r in val] == [6, 12]
  assert all(r["num_examples"] == rows["val"] for r in val)
  # The console: rank headers coarse to fine, taxa by name, the closing lines.
  assert "phase" in out and "taxa_L40   taxa_L30   taxa_L20   taxa_L10" in out
  names = {s[0] + " " + s[1] for s in inat_layout.SPECIES}
  worst = out[out.index("worst taxa on val"):].splitlines()
  assert any(n in worst[4] for n in names) and "null" not in "\n".join(worst[1:5])
  assert f"TensorBoard: tensorboard --logdir {workdir}/tensorboard" in out
  assert glob.glob(f"{workdir}/plots/confusion_*.png")
  with open(f"{workdir}/assets/preprocessing.json", encoding="utf-8") as f:
    assert [c["name"] for c in json.load(f)["metadata"]] == ["TEMPORAL", "SPATIAL"]


def _relpaths(made, orientation):
  return made["exif"][orientation], made["upright"][orientation]


def test_exif_rotated_photos_decode_upright_in_training_from_folder_and_shards(journey):
  root, made = journey["root"], journey["made"]
  folder = images_lib.ImageReader(root, SIZE)
  with h5py.File(f"{root}/packed/labels.h5", "r") as h5:
    ids = [x.decode() for x in h5["img_identifiers"][:]]
  shards = images_lib.ImageReader(f"{root}/packed/images-*.h5", SIZE)
  for o in inat_layout.EXIF_ORIENTATIONS:
    name, twin = _relpaths(made, o)
    want = preprocessing.to_rgb_uint8(twin, SIZE).astype(float)
    got = folder(0, name.encode()).astype(float)
    assert np.abs(got - want).mean() < JPEG_TOLERANCE, o
    # Packed at --max_side=48: turned upright, shrunk and re-encoded once more.
    got = shards(ids.index(name), name.encode()).astype(float)
    assert np.abs(got - want).mean() < JPEG_TOLERANCE, o


def test_evaluate_export_predict_and_serve_answer(journey, tmp_path):
  root, made, workdir = journey["root"], journey["made"], journey["workdir"]
  ev = cli("linnaeus_jax.evaluate", f"--workdir={workdir}")
  assert "val_mask_SPATIAL" in ev.stdout and "worst taxa on val" in ev.stdout
  bundle = str(tmp_path / "bundle")
  cli("linnaeus_jax.export", f"--workdir={workdir}", f"--out={bundle}")
  # predict on the nested val/ folder: every photo, found below, named relative to it.
  preds = str(tmp_path / "preds.jsonl")
  cli("linnaeus_jax.predict", f"--bundle={bundle}", f"--images={root}/val", f"--out={preds}")
  with open(preds, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  want = sorted(os.path.relpath(im["file_name"], "val") for im in made["val"])
  assert sorted(r["relpath"] for r in records) == want
  assert all(r["error"] is None and len(r["ranks"]) == 4 for r in records)
  # EXIF photos and their upright twins predict alike, in predict and in serve.
  pairs = [_relpaths(made, o) for o in inat_layout.EXIF_ORIENTATIONS]
  files = [p for name, twin in pairs for p in (os.path.join(root, name), twin)]
  preds = str(tmp_path / "exif.jsonl")
  cli("linnaeus_jax.predict", f"--bundle={bundle}", f"--images={','.join(files)}",
      f"--out={preds}", "--top_k=3")
  with open(preds, encoding="utf-8") as f:
    by_file = {r["image"]: r for r in map(json.loads, f)}
  predicted = [by_file[p] for p in files]
  served = _serve(bundle, files)
  for got in (predicted, served):
    for a, b in zip(got[::2], got[1::2]):
      assert a["error"] is None and b["error"] is None
      for ra, rb in zip(a["ranks"], b["ranks"]):
        assert ra["top_k"][0][0] == rb["top_k"][0][0], (a, b)
        assert abs(ra["top_k"][0][1] - rb["top_k"][0][1]) < 0.02, (a, b)
  for p, s in zip(predicted, served):  # the server answers as predict does
    for rp, rs in zip(p["ranks"], s["ranks"]):
      assert rp["top_k"][0][0] == rs["top_k"][0][0]
      assert abs(rp["top_k"][0][1] - rs["top_k"][0][1]) < 1e-5


def _serve(bundle, files):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "linnaeus_jax.serve", f"--bundle={bundle}",
                           f"--port={port}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  url = f"http://127.0.0.1:{port}"
  try:
    t0 = time.time()
    while True:
      assert proc.poll() is None and time.time() - t0 < 300, "the server did not start"
      try:
        if httpx.get(f"{url}/health").status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.2)
    instances = []
    for p in files:
      with open(p, "rb") as f:
        instances.append({"image_b64": base64.b64encode(f.read()).decode()})
    r = httpx.post(f"{url}/predict", json={"instances": instances, "top_k": 3}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]
  finally:
    proc.terminate()
    proc.wait(30)
