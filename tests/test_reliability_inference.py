"""Hostile input to inference (docs/inference.md, "What can go wrong"): every image gets its
record whatever fails, impossible metadata is masked with a warning naming it, and a damaged
bundle, workdir or flag is one `error:` line with exit 1 that creates nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from linnaeus_jax.inference import bundle, predict
from linnaeus_jax.inference.predictor import Predictor, load_workdir

from conftest import ROOT

TESTS = os.path.dirname(os.path.abspath(__file__))


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def bundle_dir(trained_workdir, tmp_path_factory):
  """The trained run as a bundle, written in-process (predict does not read model.jax_exported,
  so it is left out: no export, no extra process)."""
  w = load_workdir(trained_workdir)
  out = str(tmp_path_factory.mktemp("reliability") / "bundle")
  bundle.write(out, w["config"], w["variables"], w["preprocessing"], w["class_maps"],
               w["taxonomy_json"], {"step": int(w["step"])}, None)
  return out


@pytest.fixture(scope="module")
def predictor(bundle_dir):
  return Predictor.from_bundle(bundle_dir, buckets=(1, 2))


def _good_images(predictor, n):
  return sorted(glob.glob(os.path.join(predictor.config.data.hybrid.images_dir, "*.jpg")))[:n]


# ----------------------------------------------------------------------------- every image


def test_predict_keeps_every_image_in_order_whatever_fails(predictor, bundle_dir, tmp_path):
  """Good images among a garbage file, a missing path and a chunk of only unreadable images
  (--buckets=1,2: chunks of 2), plus bad metadata lines: every image has its record, in input
  order, the run exits 0 and counts the errors; --out's missing folders are created. Before,
  the all-bad chunk crashed the run and nothing was written."""
  good = _good_images(predictor, 3)
  photos = tmp_path / "photos"
  photos.mkdir()
  for g in good:
    shutil.copy(g, photos)
  good = [str(photos / os.path.basename(g)) for g in good]
  (photos / "garbage.jpg").write_bytes(b"not an image at all")
  (photos / "empty.jpg").write_bytes(b"")
  (photos / "half.jpg").write_bytes(open(good[0], "rb").read()[:60])  # a truncated JPEG
  images = [good[0], str(photos / "garbage.jpg"),          # chunk 1: good, bad
            str(tmp_path / "missing.jpg"), good[1],        # chunk 2: bad, good
            str(photos / "empty.jpg"), str(photos / "half.jpg"),  # chunk 3: all bad
            good[2]]                                       # chunk 4: good
  names = [os.path.basename(g) for g in good]
  meta = [{"image": names[0], "lat": 45.0, "lon": 7.0, "elevation_m": 100},
          {"image": names[0], "lat": 45.0, "lon": 7.0, "elevation_m": 12000},  # the last wins
          {"image": good[1], "lat": 10.0, "lon": 20.0},                        # by path: used
          {"image": names[1], "lat": 11.0, "lon": 21.0},                       # by name
          {"image": names[2], "lat": 10 ** 400, "lon": 1.0,                    # no float holds it
           "datetime_utc": "1700-05-01"}]
  (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
  out = tmp_path / "new" / "deeper" / "preds.jsonl"
  r = _cli("linnaeus_jax.predict", f"--bundle={bundle_dir}", f"--images={','.join(images)}",
           f"--metadata={tmp_path / 'meta.jsonl'}", "--buckets=1,2", "--top_k=2", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "error:" not in r.stderr
  assert "7 images, 4 with errors" in r.stdout
  assert os.listdir(out.parent) == ["preds.jsonl"]  # no .partial left
  recs = [json.loads(line) for line in open(out)]
  assert [x["image"] for x in recs] == images
  bad = [False, True, True, False, True, True, False]
  assert [x["error"] is not None for x in recs] == bad
  for x, is_bad in zip(recs, bad):
    assert set(x) == {"image", "ranks", "warnings", "error"}
    assert (x["ranks"] == []) == is_bad
    assert is_bad or [t["task"] for t in x["ranks"]] == predictor.coarse_to_fine
  assert "No such file" in recs[2]["error"] and recs[4]["error"].startswith("image could not be")
  w0, w3, w6 = recs[0]["warnings"], recs[3]["warnings"], recs[6]["warnings"]
  assert any("2 lines for" in w and "the last, line 2, is used" in w for w in w0)
  assert "ELEVATION invalid: elevation_m 12000 is outside -500..9000 m" in w0
  assert any("line 3 names this image by its path and line 4 by its file name" in w for w in w3)
  assert not any("SPATIAL" in w for w in w3)  # line 3's valid lat/lon were used
  assert any(w.startswith("SPATIAL invalid: lat/lon not usable: OverflowError") for w in w6)
  assert "TEMPORAL invalid: datetime_utc '1700-05-01' is before 1800" in w6
  assert "matches no image" not in r.stderr  # the file-name line of image 3 was not unused


def test_a_batch_of_only_unreadable_images_gives_their_errors(predictor, tmp_path):
  """The Predictor and `predict.run` on batches where no image can be read (one explicit bad
  file; a missing path and garbage bytes): error records, not an exception."""
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
  res = predictor.predict([str(tmp_path / "bad.jpg")])
  assert len(res) == 1 and res[0]["ranks"] == [] and "could not be read" in res[0]["error"]
  res = predictor.predict([str(tmp_path / "nope.jpg"), b"junk"], [{"lat": 1, "lon": 2}, None])
  assert [r["image"] for r in res] == [str(tmp_path / "nope.jpg"), "#1"]
  assert all(r["error"] and r["ranks"] == [] for r in res)
  assert predictor.predict([]) == []
  out = tmp_path / "sub" / "preds.jsonl"
  counts = predict.run(predictor, [str(tmp_path / "bad.jpg")], [None], str(out), 3, 2)
  assert counts == {"images": 1, "errors": 1, "warnings": 1}
  assert json.loads(out.read_text())["error"].startswith("image could not be read")


# ----------------------------------------------------------------------------- metadata

NOW = dt.datetime.now(dt.timezone.utc)
# (request, component made invalid (None: all valid), the warning it must carry)
METADATA = [
    ({"elevation_m": 9000.5}, "ELEVATION", "elevation_m 9000.5 is outside -500..9000 m"),
    ({"elevation_m": "-501"}, "ELEVATION", "elevation_m '-501' is outside -500..9000 m"),
    ({"elevation_m": -500, "lat": 90, "lon": -180}, None, ""),
    ({"datetime_utc": "1799-12-31T23:59:59"}, "TEMPORAL", "'1799-12-31T23:59:59' is before 1800"),
    ({"datetime_utc": dt.datetime(1066, 10, 14)}, "TEMPORAL", "'1066-10-14T00:00:00' is before"),
    ({"datetime_utc": (NOW + dt.timedelta(days=3)).isoformat()}, "TEMPORAL", "is in the future"),
    ({"datetime_utc": "2999-01-01Z"}, "TEMPORAL", "datetime_utc '2999-01-01Z' is in the future"),
    ({"datetime_utc": "1800-01-01"}, None, ""),
    ({"datetime_utc": (NOW - dt.timedelta(hours=1)).isoformat()}, None, ""),
    ({"datetime_utc": "31/12/2020"}, "TEMPORAL", "datetime_utc not ISO 8601: '31/12/2020'"),
    ({"lat": 90.01, "lon": 7}, "SPATIAL", "lat/lon out of range: 90.01, 7.0"),
    ({"lat": 45, "lon": -180.5}, "SPATIAL", "lat/lon out of range: 45.0, -180.5"),
    ({"lat": 45, "lon": 10 ** 400}, "SPATIAL", "lat/lon not usable: OverflowError"),
]


@pytest.mark.parametrize("request_, invalid, warning", METADATA,
                         ids=[f"{i}-{c or 'valid'}" for i, (_, c, _) in enumerate(METADATA)])
def test_impossible_metadata_masks_its_component_with_a_warning(predictor, request_, invalid,
                                                                 warning):
  """A physically impossible value makes its component invalid (the model sees it missing)
  with a warning naming the field and value; the other components and boundary values stay
  valid. Before, elevations and dates were not range-checked."""
  full = {"lat": 45.0, "lon": 7.0, "datetime_utc": "2021-06-01T10:00:00Z", "elevation_m": 300.0}
  image = np.full((40, 40, 3), 100, np.uint8)
  _, _, valid, warnings, errors = predictor.preprocess([image], [{**full, **request_}])
  names = [c["name"] for c in predictor.layout]
  assert errors == [None]
  assert dict(zip(names, valid[0].tolist())) == {n: n != invalid for n in names}
  if invalid is None:
    assert warnings == [[]]
  else:
    assert len(warnings[0]) == 1 and warnings[0][0].startswith(f"{invalid} invalid: ")
    assert warning in warnings[0][0]


def test_duplicate_metadata_lines_warn_per_image_and_the_last_wins(tmp_path):
  """Two lines for one image: the last is used and the image's record says so; a path line
  beats a file-name line (which then counts as used); a line that is not UTF-8 is a warning."""
  lines = [b'{"image": "a.jpg", "lat": 1}', b'{"image": "a.jpg", "lat": 2}', b"\xff\xfe{",
           b'{"image": "/d/b.jpg", "lat": 3}', b'{"image": "b.jpg", "lat": 4}',
           b'{"image": "a.jpg", "lat": 5}']
  (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  md, problems, notes = predict.read_metadata(str(tmp_path / "m.jsonl"),
                                              ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"])
  assert [m and m["lat"] for m in md] == [5, 3, None]
  assert notes[0] == [f"metadata: 3 lines for 'a.jpg' in {tmp_path / 'm.jsonl'} (lines 1, 2, "
                      "6); the last, line 6, is used"]
  assert notes[1] == ["metadata: line 4 names this image by its path and line 5 by its file "
                      "name; line 4 (the path) is used"]
  assert notes[2] == []
  assert problems == [f"{tmp_path / 'm.jsonl'}:3: not UTF-8 text"]


# ----------------------------------------------------------------------------- damaged bundles


def _truncated(data: bytes) -> bytes:
  return data[:len(data) // 2]


def _wrong_config(key_path: str, value):
  def edit(data: bytes) -> bytes:
    config = json.loads(data)
    *parents, last = key_path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
    return json.dumps(config).encode()
  return edit


def _drop_a_param(data: bytes) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  with np.load(io.BytesIO(data)) as f:
    arrays = {k: f[k] for k in f.files[1:]}
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


# (file, edit: old bytes -> new bytes, expected in the BundleError's message)
BUNDLE_DAMAGE = [
    ("config.json", lambda d: b"{not json", "config.json is not valid JSON"),
    ("config.json", lambda d: b"[1, 2]", "config.json: expected a JSON object, got array"),
    ("config.json", lambda d: b"null", "config.json: expected a JSON object, got null"),
    ("config.json", _wrong_config("model.drop_path_rate", "0.1"), "config.json: TypeError"),
    ("config.json", _wrong_config("model.classification.heads", []), "config.json: TypeError"),
    ("config.json", _wrong_config("model.convnext_stages.dims", 7), "config.json: TypeError"),
    ("config.json", _wrong_config("model.drop_path_rate", 1.5), "config.json: ConfigError"),
    ("params.npz", _truncated, "params.npz cannot be read as parameters (.npz): BadZipFile"),
    ("params.npz", lambda d: b"PK\x03\x04 not really a zip", "params.npz cannot be read"),
    ("params.npz", lambda d: b"", "params.npz cannot be read"),
    ("params.npz", _drop_a_param, "params.npz does not match"),
    ("taxonomy.json", lambda d: b'{"task_keys": 3}', "taxonomy.json is not a taxonomy"),
    ("class_index_map.json", lambda d: b"[]", "class_index_map.json: expected a JSON object"),
    ("class_index_map.json", lambda d: b'{"taxa_L10": [1, 2]}', "taxa_L10 must be an object"),
    ("preprocessing.json", lambda d: d.replace(b'"size": 32', b'"size": "32"'),
     'image.size must be a positive integer, got \'32\''),
    ("preprocessing.json", lambda d: b'{"image": {"size": 32}, "metadata": {}}',
     "metadata must be a list of objects"),
    ("bundle.json", lambda d: b'["linnaeus_jax.bundle"]', "bundle.json: expected a JSON object"),
]


@pytest.mark.parametrize("name, edit, needle", BUNDLE_DAMAGE,
                         ids=[f"{i}-{n}" for i, (n, _, _) in enumerate(BUNDLE_DAMAGE)])
def test_a_damaged_bundle_file_is_a_bundle_error_naming_it(bundle_dir, tmp_path, name, edit,
                                                           needle):
  """Each damaged file of a bundle gives a BundleError (a ValueError: one `error:` line on the
  command line) that names the file and the problem, never another exception."""
  broken = tmp_path / "bundle"
  shutil.copytree(bundle_dir, broken)
  (broken / name).write_bytes(edit((broken / name).read_bytes()))
  with pytest.raises(bundle.BundleError) as e:
    Predictor.from_bundle(str(broken))
  assert needle in str(e.value) and str(broken) in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- command lines


@dataclasses.dataclass
class Case:
  """A hostile command line: `setup(case_dir, sources)` writes its input under case_dir;
  `argv` is formatted with {case} (the folder), {bundle}, {workdir}, {image}; the command must
  exit `code` with `needle` on its one `error:` line, and create nothing under case_dir."""
  id: str
  setup: Callable
  argv: list
  needle: str
  module: str = "linnaeus_jax.predict"
  code: int = 1


def _bundle_with(name: str, edit: Callable) -> Callable:
  def setup(case, src):
    shutil.copytree(src["bundle"], case / "bundle")
    (case / "bundle" / name).write_bytes(edit((case / "bundle" / name).read_bytes()))
  return setup


def _workdir_with_config(text: str) -> Callable:
  """A workdir whose config.json is `text`, with an (empty) checkpoints/ folder."""
  def setup(case, src):
    (case / "run" / "checkpoints").mkdir(parents=True)
    (case / "run" / "config.json").write_text(text)
  return setup


def _config_file(case, src):
  """A config file for evaluate whose data exist, so that only the workdir is wrong."""
  (case / "cfg.py").write_text(
      f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import tiny_config\n"
      f"def get_config():\n  return tiny_config({src['dataset']!r})\n")


def _nothing(case, src):
  del case, src


PREDICT = ["--images={image}", "--out={case}/new/preds.jsonl"]
CASES = [
    Case("bundle config.json: a string for a number",
         _bundle_with("config.json", _wrong_config("model.drop_path_rate", "0.1")),
         ["--bundle={case}/bundle", *PREDICT], "bundle/config.json: TypeError"),
    Case("bundle config.json: not JSON", _bundle_with("config.json", lambda d: d[:40]),
         ["--bundle={case}/bundle", *PREDICT], "bundle/config.json is not valid JSON"),
    Case("bundle params.npz: truncated", _bundle_with("params.npz", _truncated),
         ["--bundle={case}/bundle", *PREDICT], "bundle/params.npz cannot be read as parameters"),
    Case("workdir config.json: a list for a dict",
         _workdir_with_config('{"model": {"classification": {"heads": []}}}'),
         ["--workdir={case}/run", *PREDICT], "run/config.json: TypeError"),
    Case("--out is a folder", lambda case, src: (case / "out").mkdir(),
         ["--bundle={bundle}", "--images={image}", "--out={case}/out"], "/out is a folder"),
    Case("--buckets not numbers", _nothing, ["--bundle={bundle}", "--buckets=0,x", *PREDICT],
         "--buckets must be positive integers, got '0,x'"),
    Case("evaluate: missing workdir", _config_file,
         ["--config={case}/cfg.py", "--workdir={case}/missing"], "/missing not found",
         module="linnaeus_jax.evaluate"),
    Case("evaluate: damaged config.json", _workdir_with_config('{"data": {"img_size": "big"}}'),
         ["--workdir={case}/run"], "run/config.json: TypeError", module="linnaeus_jax.evaluate"),
]


def _tree(root) -> set:
  return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_command_lines_fail_cleanly(case, bundle_dir, trained_workdir, small_dataset,
                                            tmp_path):
  """One `error:` line naming the problem, the exit code, no traceback, and nothing created
  (no --out folder, no checkpoints/ or eval/ in a workdir)."""
  src = {"bundle": bundle_dir, "workdir": trained_workdir, "dataset": small_dataset[0],
         "image": sorted(glob.glob(os.path.join(small_dataset[0], "images", "*.jpg")))[0]}
  case.setup(tmp_path, src)
  before = _tree(tmp_path)
  argv = [a.format(case=tmp_path, **src) for a in case.argv]
  r = _cli(case.module, *argv)
  assert r.returncode == case.code, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and case.needle in errors[0], r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert _tree(tmp_path) == before
