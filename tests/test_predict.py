import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from linnaeus_jax.inference import predict
from linnaeus_jax.inference.predictor import Predictor

from conftest import ROOT


def _cli(*args, module="linnaeus_jax.predict"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_cli_writes_one_line_per_image_in_order(trained_workdir, tmp_path):
  p = Predictor.from_workdir(trained_workdir)
  src = sorted(glob.glob(os.path.join(p.config.data.hybrid.images_dir, "*.jpg")))[:3]
  folder = tmp_path / "photos"
  folder.mkdir()
  for s in src:
    shutil.copy(s, folder)
  (folder / "zz_broken.jpg").write_bytes(b"junk")
  names = sorted(os.listdir(folder))
  meta = [{"image": names[0], "lat": 45.0, "lon": 7.0, "datetime_utc": "2021-05-01T08:00:00"},
          {"image": str(folder / names[1]), "lat": "??", "lon": 7.0},
          {"image": "not_there.jpg", "lat": 1.0, "lon": 1.0}]
  (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
  out = tmp_path / "preds.jsonl"
  r = _cli(f"--workdir={trained_workdir}", f"--images={folder}",
           f"--metadata={tmp_path / 'meta.jsonl'}", "--top_k=2", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "4/4 [" in r.stderr and "'not_there.jpg' matches no image" in r.stderr
  assert "4 images, 1 with errors" in r.stdout
  lines = [json.loads(l) for l in open(out)]
  assert [l["image"] for l in lines] == [str(folder / n) for n in names]
  assert [l["error"] is None for l in lines] == [True, True, True, False]
  assert [r_["task"] for r_ in lines[0]["ranks"]] == ["taxa_L40", "taxa_L30", "taxa_L20",
                                                      "taxa_L10"]
  assert all(len(r_["top_k"]) <= 2 for r_ in lines[0]["ranks"])
  assert any("SPATIAL invalid: lat/lon not numbers" in w for w in lines[1]["warnings"])
  assert len(lines[2]["warnings"]) == 3  # no metadata at all
  # The same as the Python API.
  api = p.predict([str(folder / n) for n in names[:3]],
                  [{k: v for k, v in m.items() if k != "image"} for m in meta[:2]] + [None],
                  top_k=2)
  for a, b in zip(api, lines[:3]):
    assert a["warnings"] == b["warnings"]
    for ra, rb in zip(a["ranks"], b["ranks"]):
      assert [x[0] for x in ra["top_k"]] == [x[0] for x in rb["top_k"]]
      np.testing.assert_allclose([x[1] for x in ra["top_k"]], [x[1] for x in rb["top_k"]],
                                 atol=1e-5)


def test_cli_bad_input_exits_1_with_the_reason(tmp_path):
  r = _cli(f"--bundle={tmp_path / 'nope'}", f"--images={tmp_path}", f"--out={tmp_path / 'o'}")
  assert r.returncode == 1 and "no images in" in r.stderr
  (tmp_path / "a.jpg").write_bytes(b"x")
  for module in ("linnaeus_jax.predict", "linnaeus_jax.inference.predict"):  # shim and module
    r = _cli(f"--bundle={tmp_path / 'nope'}", f"--images={tmp_path}", f"--out={tmp_path / 'o'}",
             module=module)
    assert r.returncode == 1 and "bundle folder" in r.stderr and "not found" in r.stderr
  assert not os.path.exists(tmp_path / "o")


def test_metadata_matching_by_path_then_name(tmp_path):
  (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "lat": 1}\n{"image": "/x/b.jpg"}\n'
                                    'oops\n')
  md, problems, _ = predict.read_metadata(str(tmp_path / "m.jsonl"),
                                          ["/d1/a.jpg", "/x/b.jpg", "/d2/c.jpg"])
  assert md[0] == {"image": "a.jpg", "lat": 1} and md[1] == {"image": "/x/b.jpg"}
  assert md[2] is None
  assert any(":3: not JSON" in p for p in problems)
  md, problems, _ = predict.read_metadata(str(tmp_path / "m.jsonl"), ["/d1/a.jpg", "/d2/a.jpg"])
  assert md == [None, None] and any("names 2 images" in p for p in problems)
