"""The prediction server, started for real on a loopback port and spoken to over HTTP."""

import base64
import concurrent.futures
import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import httpx
import numpy as np
import pytest

from conftest import ROOT
from linnaeus_jax.inference import card as card_lib
from linnaeus_jax.inference import serve
from linnaeus_jax.inference.predictor import Predictor

META = {"lat": 45.5, "lon": -73.6, "datetime_utc": "2021-06-01T10:00:00Z", "elevation_m": 30.0}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle_dir(trained_workdir, tmp_path_factory):
  from linnaeus_jax.inference import export  # pylint: disable=g-import-not-at-top
  return export.export_workdir(trained_workdir, str(tmp_path_factory.mktemp("b") / "bundle"),
                               platforms=("cpu",))


def start(bundle_dir, *flags):
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "linnaeus_jax.serve", f"--bundle={bundle_dir}",
                           f"--port={port}", *flags], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  url = f"http://127.0.0.1:{port}"
  t0 = time.time()
  while time.time() - t0 < 300:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    try:
      if httpx.get(f"{url}/health").status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  proc.kill()
  raise TimeoutError(proc.communicate()[0][-3000:])


def stop(proc) -> str:
  """SIGTERM: uvicorn finishes the requests in flight, then re-raises the signal."""
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGTERM and "stopped: " in out, out[-3000:]
  return out


@pytest.fixture(scope="module")
def predictor(bundle_dir):
  return Predictor.from_bundle(bundle_dir)


@pytest.fixture(scope="module")
def server(bundle_dir):
  proc, url = start(bundle_dir, "--max_batch=8", "--max_wait_ms=50", "--max_body_mb=4",
                    "--max_pixels=1e7")
  yield url
  stop(proc)


@pytest.fixture(scope="module")
def images(trained_workdir):
  folder = json.load(open(os.path.join(trained_workdir, "config.json")))["data"]["hybrid"][
      "images_dir"]
  return [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "*.jpg")))[:8]]


def _b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def _assert_same(records, expected):
  assert len(records) == len(expected)
  for r, e in zip(records, expected):
    assert r["image"] == e["image"] and r["warnings"] == e["warnings"] and r["error"] is None
    assert [x["task"] for x in r["ranks"]] == [x["task"] for x in e["ranks"]]
    for a, b in zip(r["ranks"], e["ranks"]):
      assert [t for t, _ in a["top_k"]] == [t for t, _ in b["top_k"]]
      np.testing.assert_allclose([p for _, p in a["top_k"]], [p for _, p in b["top_k"]],
                                 atol=1e-6)


def test_predictions_equal_the_predictor(server, predictor, images):
  metas = [META, None, {"lat": 10.0, "lon": 20.0}]
  body = {"instances": [{"image_b64": _b64(im), **(m or {})} for im, m in zip(images, metas)],
          "top_k": 3}
  r = httpx.post(f"{server}/predict", json=body, timeout=60)
  assert r.status_code == 200, r.text
  expected = predictor.predict(images[:3], metas, top_k=3)
  _assert_same(r.json()["predictions"], expected)
  # multipart: one file and the metadata as form fields
  r = httpx.post(f"{server}/predict", files={"image": ("a.jpg", images[0], "image/jpeg")},
                 data={k: str(v) for k, v in META.items()}, timeout=60)
  assert r.status_code == 200, r.text
  got = r.json()["predictions"]
  assert got[0]["image"] == "a.jpg"
  got[0]["image"] = "#0"
  _assert_same(got, predictor.predict(images[:1], [META]))  # the server's default top_k, 5


def test_info_is_the_bundles_card(server, bundle_dir, trained_workdir):
  card = httpx.get(f"{server}/info").json()
  assert card == json.load(open(os.path.join(bundle_dir, "card.json")))
  facts = json.load(open(os.path.join(trained_workdir, "assets", "data_summary.json")))
  assert card["data"] == facts and card["tasks_coarse_to_fine"][0] == "taxa_L40"
  assert card["validation"] == card_lib.final_validation(
      os.path.join(trained_workdir, "metrics.jsonl"))
  assert {"val", "val_mask_meta"} <= set(card["validation"]) and card["provenance"]["step"] == 20
  readme = open(os.path.join(bundle_dir, "README.md")).read()
  val = card["validation"]["val_mask_meta"]
  assert f"| val_mask_meta | 20 | {val['loss']:.4f} | {val['acc1/taxa_L40']:.1f} |" in readme


def test_a_corrupt_image_fails_only_its_own_request(server, predictor, images):
  """8 concurrent requests, one with a JPEG cut in half: that one is a 422 naming the
  problem, the 7 others are answered as alone, each once (the batcher's sample count)."""
  before = httpx.get(f"{server}/health").json()
  bodies = [{"instances": [{"image_b64": _b64(im if i != 3 else im[:len(im) // 2]), **META}]}
            for i, im in enumerate(images)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    responses = list(pool.map(lambda b: httpx.post(f"{server}/predict", json=b, timeout=60),
                              bodies))
  assert [r.status_code for r in responses] == [200] * 3 + [422] + [200] * 4
  assert responses[3].json()["problems"] == [
      "instances[0]: image: cannot decode (Truncated File Read)"]
  expected = predictor.predict(images, [META] * 8)
  for i, r in enumerate(responses):
    if i != 3:
      _assert_same(r.json()["predictions"], [{**expected[i], "image": "#0"}])
  after = httpx.get(f"{server}/health").json()
  assert after["samples"] - before["samples"] == 7
  assert after["requests"] - before["requests"] == 7


def _png_header(w: int, h: int) -> bytes:
  """A PNG claiming w x h pixels with a few bytes of pixel data (a decompression bomb's
  header: 40 bytes that would decode to w x h x 3)."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


HOSTILE = {
    "non-image bytes": (dict(json={"instances": [{"image_b64": _b64(b"not an image" * 10)}]}),
                        422, "instances[0]: image: cannot decode (cannot identify image file)"),
    "20000x20000 PNG header": (dict(json={"instances": [{"image_b64": _b64(_png_header(
        20000, 20000))}]}), 422, "Image size (400000000 pixels) exceeds limit"),
    "body over the limit": (dict(content=b"x" * (5 * 2**20),
                                 headers={"content-type": "application/json"}), 413,
                            "over this server's limit of 4 MiB"),
    "malformed multipart": (dict(content=b"--xx\r\nContent-Disposition: form-data\r\n\r\nabc",
                                 headers={"content-type": "multipart/form-data; boundary=xx"}),
                            400, "multipart"),
    "missing image": (dict(json={"instances": [{"lat": 1.0, "lon": 2.0}]}), 422,
                      "instances[0] needs exactly one of image_b64, image_path"),
    "lat=1e9": (dict(json={"instances": [{"image_b64": "", "lat": 1e9, "lon": 0}]}), 422,
                "instances[0].lat must be within -90..90, got 1e+09"),
    "malformed JSON": (dict(content=b'{"instances": [', headers={
        "content-type": "application/json"}), 400, "malformed JSON"),
    "wrong content type": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415,
                           "'text/plain' is not accepted"),
    "unknown field": (dict(json={"instances": [{"image_b64": "", "colour": 1}], "topk": 2}),
                      422, "unknown field 'topk'"),
    "path not allowed": (dict(json={"instances": [{"image_path": "/etc/passwd"}]}), 422,
                         "--allow_paths"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_are_4xx_naming_the_problem(server, name):
  kwargs, status, needle = HOSTILE[name]
  r = httpx.post(f"{server}/predict", timeout=60, **kwargs)
  assert r.status_code == status, r.text
  assert needle in r.json()["error"], r.json()
  assert httpx.get(f"{server}/health").status_code == 200


def test_every_problem_of_a_request_is_named_at_once(server, images):
  """Metadata and image problems together, each named by its instance's index; an image that
  cannot be decoded is found also when the request is already refused for its metadata, and
  its message carries PIL's reason without the repr of a BytesIO."""
  body = {"instances": [{"image_b64": _b64(images[0]), "lat": 95.0, "lon": 0.0},
                        {"image_b64": _b64(images[1]), "elevation_m": 20000,
                         "datetime_utc": "yesterday"},
                        {"image_b64": _b64(images[2])},
                        {"image_b64": "not base64!", "lat": 91.0, "lon": 0.0},
                        {"image_b64": _b64(b"junk" * 10), "elevation_m": -600},
                        {"image_b64": "data:text/plain;base64," + _b64(images[3])},
                        {"image_b64": _b64(images[4])[:-4]}],
          "top_k": 0}
  r = httpx.post(f"{server}/predict", json=body, timeout=60)
  assert r.status_code == 422
  problems = r.json()["problems"]
  assert problems[-1].startswith("instances[6]: image: cannot decode (image file is truncated")
  assert problems[:-1] == [
      "top_k must be an integer >= 1, got 0",
      "instances[0].lat must be within -90..90, got 95",
      "instances[1].datetime_utc is not an ISO 8601 date-time: 'yesterday'",
      "instances[1].elevation_m 20000.0 is outside -500..9000 m",
      "instances[3].lat must be within -90..90, got 91",
      "instances[3].image_b64 is not valid base64 (Only base64 data is allowed)",
      "instances[4].elevation_m -600.0 is outside -500..9000 m",
      "instances[4]: image: cannot decode (cannot identify image file)",
      "instances[5].image_b64: a data URL must start data:image/<type>;base64, (got "
      "'data:text/plain;base64')"]
  assert "object at 0x" not in r.text
  # multipart: the form's fields and its file, at once
  r = httpx.post(f"{server}/predict", files={"image": ("a.jpg", b"junk" * 10, "image/jpeg")},
                 data={"lat": "95", "lon": "0"}, timeout=60)
  assert r.status_code == 422
  assert r.json()["problems"] == ["form.lat must be within -90..90, got 95",
                                  "form: image: cannot decode (cannot identify image file)"]


def test_base64_with_line_breaks_or_a_data_url_is_accepted(server, predictor, images):
  """MIME's 76-character lines (\\n or \\r\\n) and data URLs of any image type give the same
  predictions as plain base64."""
  plain = _b64(images[0])
  mime = "\n".join(plain[i:i + 76] for i in range(0, len(plain), 76))
  forms = [plain, mime + "\n", mime.replace("\n", "\r\n"), "data:image/jpeg;base64," + plain,
           "data:image/png;base64," + mime.replace("\n", "\r\n")]
  assert "\n" in forms[1].rstrip("\n")  # the image spans several lines
  body = {"instances": [{"image_b64": b64, **META} for b64 in forms], "top_k": 3}
  r = httpx.post(f"{server}/predict", json=body, timeout=60)
  assert r.status_code == 200, r.text
  expected = predictor.predict([images[0]] * len(forms), [META] * len(forms), top_k=3)
  _assert_same(r.json()["predictions"], expected)


@pytest.mark.parametrize("data", [b"x" * (5 * 2**20), iter([b"x" * 2**20] * 5)],
                         ids=["content-length", "chunked"])
def test_an_oversized_body_is_answered_413_not_reset(server, data):
  """urllib sends the whole body before it reads the answer: the server reads (and drops) the
  rest of a body over --max_body_mb, so the client gets the 413 and its reason instead of a
  reset connection (a declared length and a chunked body alike)."""
  request = urllib.request.Request(f"{server}/predict", data=data,
                                   headers={"content-type": "application/json"})
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(request, timeout=60)
  assert e.value.code == 413
  assert "over this server's limit of 4 MiB (--max_body_mb)" in json.load(e.value)["error"]
  assert httpx.get(f"{server}/health").status_code == 200


def test_an_address_that_cannot_be_served_is_one_error_line(bundle_dir):
  """A port outside 1..65535, an address not on this machine, a port in use: one `error:`
  line and exit 1, before the model loads and without any 'serving' or 'ready' line (uvicorn
  would have served port 99999 on 34463, its value mod 65536)."""
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = {("--port=99999",): "--port=99999 is not a TCP port (1..65535)",
             ("--port=0",): "--port=0 is not a TCP port (1..65535)",
             ("--host=203.0.113.1", "--port=8000"): "cannot listen on --host=203.0.113.1 "
             "--port=8000: Cannot assign requested address (not an address of this machine)",
             (f"--port={taken.getsockname()[1]}",): "Address already in use"}
    for flags, needle in cases.items():
      r = subprocess.run([sys.executable, "-m", "linnaeus_jax.serve", f"--bundle={bundle_dir}",
                          *flags], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
      assert r.returncode == 1, (flags, r.stdout, r.stderr)
      assert r.stdout == "" and r.stderr.count("\n") == 1, (flags, r.stdout, r.stderr)
      assert r.stderr.startswith("error: ") and needle in r.stderr, (flags, r.stderr)


def test_sigterm_finishes_the_request_in_flight(bundle_dir, images):
  """A long wait for company (max_wait 2 s): SIGTERM arrives while a request waits in the
  batcher; it is still answered, then the server exits 0."""
  proc, url = start(bundle_dir, "--max_batch=8", "--max_wait_ms=2000")
  result = {}
  t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
      f"{url}/predict", json={"instances": [{"image_b64": _b64(images[0])}]}, timeout=60)))
  t.start()
  time.sleep(0.5)
  out = stop(proc)
  t.join()
  assert result["r"].status_code == 200, result["r"].text
  assert "ready: compiled buckets 1, 8 in" in out and "stopped: 1 requests served" in out


def test_batcher_gathers_up_to_max_batch(predictor):
  """Direct: 20 samples queued at once on max_batch 8 -> device calls of 8, 8, 4."""
  p = predictor
  sample = p.prepare(np.zeros((8, 8, 3), np.uint8), META)
  b = serve.Batcher(p, max_batch=8, max_wait_s=0.5)
  sizes, real = [], p.probs_batch
  p.probs_batch = lambda *a: sizes.append(len(a[0])) or real(*a)
  futures = [b.submit(sample) for _ in range(20)]
  probs = [f.result(timeout=120) for f in futures]
  b.close()
  del p.probs_batch
  assert sizes == [8, 8, 4] and b.samples == 20 and b.batches == 3
  want = real(*p.stack([sample]))
  for pr in probs:
    for t in want:
      np.testing.assert_allclose(pr[t], want[t][0], atol=1e-6)
