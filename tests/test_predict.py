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
  assert r.returncode == 1 and f"no image files in {tmp_path} or below" in r.stderr
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


def _touch(root, *names):
  for n in names:
    (root / n).parent.mkdir(parents=True, exist_ok=True)
    (root / n).write_bytes(b"x")


def test_folders_are_searched_below_in_a_fixed_order(tmp_path):
  """Recursive by default, depth first with names sorted at every level (not the file
  system's order), relative paths with '/'; files given directly have no relative path."""
  _touch(tmp_path / "p", "sub/a.jpg", "b.JPG", "sub-2/c.jpeg", "a/x/y.png", "a/z.webp",
         "a/notes.txt", "empty/readme.md")
  _touch(tmp_path, "loose.jpg")
  paths, rels, empty = predict.list_images([str(tmp_path / "p"), str(tmp_path / "loose.jpg"),
                                            str(tmp_path / "p" / "empty")])
  want = ["a/x/y.png", "a/z.webp", "b.JPG", "sub/a.jpg", "sub-2/c.jpeg"]
  assert rels == want + [None]
  assert paths == [os.path.join(tmp_path, "p", *r.split("/")) for r in want] + [
      str(tmp_path / "loose.jpg")]
  assert empty == [str(tmp_path / "p" / "empty")]
  paths, rels, empty = predict.list_images([str(tmp_path / "p")], recursive=False)
  assert paths == [str(tmp_path / "p" / "b.JPG")] and rels == ["b.JPG"] and empty == []


def test_cli_without_any_image_says_where_it_looked(tmp_path):
  """No image below --images: one `error:` line naming the folder and the extensions, exit 1,
  nothing written; with --recursive=false, images only in subfolders are not found, and the
  message says why."""
  _touch(tmp_path / "p", "notes.txt", "sub/a.jpg")
  out = tmp_path / "o" / "preds.jsonl"
  r = _cli("--bundle=nope", f"--images={tmp_path / 'p'}", "--recursive=false", f"--out={out}")
  assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
  assert r.stderr == (f"error: no image files in {tmp_path / 'p'} (subfolders not searched: "
                      "--recursive=false); looked for .jpg .jpeg .png .webp .bmp .gif .tif "
                      ".tiff (any case)\n")
  (tmp_path / "p" / "sub" / "a.jpg").unlink()
  r = _cli("--bundle=nope", f"--images={tmp_path / 'p'}", f"--out={out}")
  assert r.returncode == 1 and r.stderr.startswith(
      f"error: no image files in {tmp_path / 'p'} or below; looked for .jpg"), r.stderr
  assert not os.path.exists(tmp_path / "o")


def test_metadata_matching_by_relative_path(tmp_path):
  """A relative path matches its image; one that two --images folders share, or a file name
  of two images, matches none (with a warning, not also 'matches no image'); a relative path
  is not ambiguous because another image has that file name."""
  (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(m) for m in [
      {"image": "sub/a.jpg", "lat": 1}, {"image": "a.jpg", "lat": 2}, {"image": "c.jpg", "lat": 3},
      {"image": "x/d.jpg", "lat": 4}, {"image": "d.jpg", "lat": 5}]) + "\n")
  images = ["/p/a.jpg", "/p/sub/a.jpg", "/p/sub/c.jpg", "/p/x/d.jpg", "/q/x/d.jpg"]
  rels = ["a.jpg", "sub/a.jpg", "sub/c.jpg", "x/d.jpg", "x/d.jpg"]
  md, problems, notes = predict.read_metadata(str(tmp_path / "m.jsonl"), images, rels)
  assert [m and m["lat"] for m in md] == [2, 1, 3, None, None]
  m = tmp_path / "m.jsonl"
  assert problems == [f"{m}: 'x/d.jpg' names 2 images; give their paths",
                      f"{m}: 'd.jpg' names 2 images; give their paths"]
  assert notes == [[]] * 5
  # a relative path and a file name for one image: the relative path wins, and says so
  (tmp_path / "m.jsonl").write_text('{"image": "c.jpg", "lat": 3}\n{"image": "sub/c.jpg"}\n')
  md, problems, notes = predict.read_metadata(str(tmp_path / "m.jsonl"), images[2:3], rels[2:3])
  assert md == [{"image": "sub/c.jpg"}] and problems == []
  assert notes == [["metadata: line 2 names this image by its relative path and line 1 by its "
                    "file name; line 2 (the relative path) is used"]]


def test_cli_searches_subfolders_and_joins_metadata_by_relative_path(trained_workdir, tmp_path):
  """Images below --images, in sorted order, each record with its `relpath`; meta.jsonl lines
  naming relative paths or unambiguous file names are used."""
  folder = json.load(open(os.path.join(trained_workdir, "config.json")))["data"]["hybrid"][
      "images_dir"]
  src = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:4]
  rels = ["b.jpg", "other/a.jpg", "sub/a.jpg", "sub/deeper/c.jpg"]
  for s, rel in zip(src, rels):
    os.makedirs(os.path.dirname(tmp_path / "p" / rel), exist_ok=True)
    shutil.copy(s, tmp_path / "p" / rel)
  where = {"lat": 45.0, "lon": 7.0}
  (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps({"image": k, **where}) for k in (
      "sub/a.jpg", "c.jpg", "b.jpg", "a.jpg")) + "\n")
  out = tmp_path / "preds.jsonl"
  r = _cli(f"--workdir={trained_workdir}", f"--images={tmp_path / 'p'}",
           f"--metadata={tmp_path / 'meta.jsonl'}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "4 images, 0 with errors" in r.stdout
  assert "'a.jpg' names 2 images" in r.stderr and "matches no image" not in r.stderr
  lines = [json.loads(l) for l in open(out)]
  assert [l["relpath"] for l in lines] == rels
  assert [l["image"] for l in lines] == [str(tmp_path / "p" / r_) for r_ in rels]
  assert list(lines[0]) == ["image", "relpath", "ranks", "warnings", "error"]
  no_place = [any(w.startswith("SPATIAL invalid") for w in l["warnings"]) for l in lines]
  assert no_place == [False, True, False, False]  # other/a.jpg: only the ambiguous 'a.jpg'
  p = Predictor.from_workdir(trained_workdir)
  api = p.predict([str(tmp_path / "p" / r_) for r_ in rels], [where, None, where, where])
  for a, b in zip(api, lines):
    assert a["warnings"] == b["warnings"]
    assert [x[0] for x in a["ranks"][-1]["top_k"]] == [x[0] for x in b["ranks"][-1]["top_k"]]
