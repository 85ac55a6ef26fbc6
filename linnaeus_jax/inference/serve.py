"""python -m linnaeus_jax.serve --bundle=DIR [--host --port --max_batch --max_wait_ms ...]

An HTTP prediction server (docs/inference.md#serving) on Starlette and uvicorn:

  POST /predict  JSON {"instances": [{"image_b64" | "image_path", "lat", "lon", "datetime_utc",
                 "elevation_m"}, ...], "top_k": k}, or multipart with a file field `image` and
                 the metadata as form fields -> {"predictions": [record, ...]} (preds.jsonl's)
  GET  /info     the bundle's model card (card.py)
  GET  /health   200 once every bucket is compiled, 503 before; counters of the batcher

Concurrent requests meet in one `Batcher`: their images, decoded on a thread pool, are run as
one device call of up to `max_batch` (waiting at most `max_wait_ms` for more), and each request
gets its own rows back. Every problem of a request (malformed JSON or multipart, unknown or
missing fields, impossible metadata, an undecodable or oversized image, a body over the limit)
is a 4xx naming all of them, each by its instance (`instances[2]: image: cannot decode (...)`);
other requests, in the same device call or not, are unaffected. `image_b64` may have line breaks
or be a data URL (`decode_b64`). The address is bound before the model loads (`bind`): one that
cannot be served is an `error:` line and exit 1.
SIGTERM stops accepting connections, finishes the requests in flight and then ends the process
by that SIGTERM (uvicorn's way: supervisors see a terminated, not a failed, server).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import datetime as dt
import errno
import io
import json
import math
import os
import queue
import re
import socket
import sys
import threading
import time

import numpy as np
from PIL import Image

from linnaeus_jax import preprocessing
from linnaeus_jax.inference import card as card_lib
from linnaeus_jax.inference import predictor as predictor_lib

META_FIELDS = ("lat", "lon", "datetime_utc", "elevation_m")
IMAGE_FIELDS = ("image_b64", "image_path")
BUCKETS = (1, 8, 32)
# Most bytes of a body over --max_body_mb read (and dropped) to answer it: clients such as
# urllib send the whole body before reading the answer, and a server that closes with the body
# unread resets the connection, so they would see the reset instead of the 413. Past this the
# 413 is sent at once and the connection closed.
DISCARD_MAX = 256 * 2**20


class RequestError(Exception):
  """A request that cannot be served as sent: an HTTP status and every problem found; `close`:
  the connection is to be closed after the answer (its body was not read to the end)."""

  def __init__(self, status: int, problems: list[str], close: bool = False):
    super().__init__("; ".join(problems))
    self.status, self.problems, self.close = status, problems, close


class Instance:
  """One image of a request as parsed: the image (bytes, a path, or None when it could not be
  had), its record's name, its checked metadata, where it is in the request (`instances[2]`,
  `form`) and every problem found with it."""

  def __init__(self, where: str, name: str = ""):
    self.where, self.name, self.image, self.meta = where, name, None, {}
    self.problems: list[str] = []


# ----------------------------------------------------------------------------- checking requests


def _number(value, where: str, problems: list[str]) -> float | None:
  """A finite number from JSON (not a bool) or a form field's text; else a problem."""
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      problems.append(f"{where} must be a number, got {value!r}")
      return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    problems.append(f"{where} must be a number, got {json.dumps(value)}")
    return None
  if not math.isfinite(value):
    problems.append(f"{where} must be finite, got {value}")
    return None
  return float(value)


def check_metadata(fields: dict, where: str, problems: list[str]) -> dict:
  """The metadata of one instance, checked: lat/lon together and in range, elevation and date
  physically possible (`predictor.implausible`); problems are appended, named by `where`."""
  meta = {}
  for key in ("lat", "lon", "elevation_m"):
    if fields.get(key) is not None:
      x = _number(fields[key], f"{where}.{key}", problems)
      if x is not None:
        meta[key] = x
  if ("lat" in fields) != ("lon" in fields):
    problems.append(f"{where}: lat and lon go together (got only "
                    f"{'lat' if 'lat' in fields else 'lon'})")
  for key, limit in (("lat", 90.0), ("lon", 180.0)):
    if key in meta and abs(meta[key]) > limit:
      problems.append(f"{where}.{key} must be within -{limit:g}..{limit:g}, got {meta[key]:g}")
  if fields.get("datetime_utc") is not None:
    value = fields["datetime_utc"]
    if not isinstance(value, str):
      problems.append(f"{where}.datetime_utc must be an ISO 8601 string, got {json.dumps(value)}")
    else:
      try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        meta["datetime_utc"] = value
      except ValueError:
        problems.append(f"{where}.datetime_utc is not an ISO 8601 date-time: {value!r}")
  for encoder in ("elevation", "cyclic_date"):
    why = predictor_lib.implausible(encoder, meta)
    if why:
      problems.append(f"{where}.{why}")
  return meta


def _message(e: Exception) -> str:
  """`e`'s message without reprs of objects (PIL names a BytesIO `<_io.BytesIO object at
  0x...>`), or its type's name when nothing is left."""
  text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(e)).strip()
  return text or type(e).__name__


def image_problem(data: bytes, max_pixels: int) -> str | None:
  """Why `data` cannot be an image to decode here (from its header alone), or None."""
  if not data:
    return "empty (0 bytes)"
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
  except Image.DecompressionBombError as e:
    return f"refused ({_message(e)})"
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    return f"cannot decode ({_message(e)})"
  if w * h > max_pixels:
    return (f"{w}x{h} ({w * h / 1e6:.1f} Mpx) is over this server's limit of "
            f"{max_pixels / 1e6:.1f} Mpx (--max_pixels)")
  return None


def decode_b64(value, where: str, problems: list[str]) -> bytes | None:
  """The bytes of an `image_b64`: plain base64, with line breaks (MIME's 76-character lines,
  \\n or \\r\\n) or other whitespace anywhere, or a data URL `data:image/<type>;base64,...`;
  else None and a problem."""
  if not isinstance(value, str):
    problems.append(f"{where}.image_b64 must be a base64 string, got {json.dumps(value)[:50]}")
    return None
  if value[:5].lower() == "data:":
    head, comma, value = value.partition(",")
    kind, *params = [p.strip().lower() for p in head[5:].split(";")]
    if not comma or not kind.startswith("image/") or "base64" not in params:
      problems.append(f"{where}.image_b64: a data URL must start data:image/<type>;base64, "
                      f"(got {head[:60]!r})")
      return None
  try:
    return base64.b64decode("".join(value.split()), validate=True)
  except (binascii.Error, ValueError) as e:
    problems.append(f"{where}.image_b64 is not valid base64 ({_message(e)})")
    return None


def parse_json(body: bytes, allow_paths: bool, max_instances: int):
  """([Instance], top_k, problems of the request as a whole) of a JSON request; RequestError
  when it has no instances to check (malformed, none, too many)."""
  try:
    obj = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(400, [f"malformed JSON: {e}"]) from None
  if not isinstance(obj, dict):
    raise RequestError(400, ['the body must be a JSON object {"instances": [...]}'])
  problems = [f"unknown field {k!r} (allowed: instances, top_k)" for k in obj
              if k not in ("instances", "top_k")]
  top_k = _top_k(obj.get("top_k"), problems)
  instances = obj.get("instances")
  if not isinstance(instances, list) or not instances:
    problems.append('"instances" must be a non-empty list of objects')
    raise RequestError(400 if "instances" not in obj else 422, problems)
  if len(instances) > max_instances:
    raise RequestError(413, [f"{len(instances)} instances in one request, over this server's "
                             f"limit of {max_instances}"])
  out = []
  for i, inst in enumerate(instances):
    one = Instance(f"instances[{i}]", f"#{i}")
    where, mine = one.where, one.problems
    out.append(one)
    if not isinstance(inst, dict):
      mine.append(f"{where} must be an object, got {json.dumps(inst)[:50]}")
      continue
    mine += [f"{where}: unknown field {k!r} (allowed: {', '.join(IMAGE_FIELDS + META_FIELDS)})"
             for k in inst if k not in IMAGE_FIELDS + META_FIELDS]
    one.meta = check_metadata(inst, where, mine)
    given = [k for k in IMAGE_FIELDS if k in inst]
    if len(given) != 1:
      mine.append(f"{where} needs exactly one of image_b64, image_path"
                  + (f" (got {', '.join(given)})" if given else ""))
    elif given == ["image_path"]:
      path = inst["image_path"]
      if not allow_paths:
        mine.append(f"{where}.image_path is not accepted by this server (start it with "
                    "--allow_paths to read images from its disk)")
      elif not isinstance(path, str) or not os.path.isfile(path):
        mine.append(f"{where}.image_path: no such file: {json.dumps(path)[:200]}")
      else:
        one.image = one.name = path
    else:
      one.image = decode_b64(inst["image_b64"], where, mine)
  return out, top_k, problems


def _top_k(value, problems: list[str]) -> int | None:
  if value is None:
    return None
  if isinstance(value, str) and value.isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    problems.append(f"top_k must be an integer >= 1, got {json.dumps(value)}")
    return None
  return value


async def parse_multipart(request, body: bytes):
  """([Instance], top_k, problems of the request as a whole) of a multipart request with one
  file field `image` and the metadata (and top_k) as text fields."""
  from starlette.formparsers import MultiPartException  # pylint: disable=g-import-not-at-top
  from starlette.requests import Request  # pylint: disable=g-import-not-at-top

  async def replay():
    return {"type": "http.request", "body": body, "more_body": False}
  try:
    form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
  except MultiPartException as e:
    raise RequestError(400, [f"malformed multipart body: {e.message}"]) from None
  except Exception as e:  # pylint: disable=broad-except  (the multipart parser's own errors)
    raise RequestError(400, [f"malformed multipart body: {type(e).__name__}: {e}"]) from None
  problems = [f"unknown form field {k!r} (allowed: image, {', '.join(META_FIELDS)}, top_k)"
              for k in form if k not in ("image", "top_k") + META_FIELDS]
  top_k = _top_k(form.get("top_k"), problems)
  one = Instance("form")
  one.meta = check_metadata({k: form[k] for k in META_FIELDS if k in form}, "form", one.problems)
  upload = form.get("image")
  if upload is None or isinstance(upload, str):
    raise RequestError(400, problems + one.problems + ["multipart needs a file field 'image'"])
  one.image, one.name = await upload.read(), upload.filename or "image"
  return [one], top_k, problems


# ----------------------------------------------------------------------------- batching


class Batcher:
  """One thread that runs the device: samples submitted from any thread are gathered into one
  `probs_batch` call of up to `max_batch`. After the first it waits for more, at most
  `max_wait_s`, and only while `coming()` (samples being decoded) says more are on their way: a
  lone request runs at once."""

  def __init__(self, predictor, max_batch: int, max_wait_s: float, coming=lambda: 1):
    self.predictor, self.max_batch, self.max_wait_s = predictor, max_batch, max_wait_s
    self.coming = coming
    self.queue = queue.Queue()
    self.batches = self.samples = 0
    self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
    self.thread.start()

  def submit(self, sample: tuple) -> concurrent.futures.Future:
    """`sample`: a `Predictor.prepare` output; the future's result is {task: probs (C,)}."""
    future = concurrent.futures.Future()
    self.queue.put((sample, future))
    return future

  def close(self) -> None:
    self.queue.put(None)
    self.thread.join()

  def _gather(self, first):
    items, deadline = [first], time.monotonic() + self.max_wait_s
    while len(items) < self.max_batch:
      try:  # what is already queued is always taken
        item = self.queue.get_nowait()
      except queue.Empty:
        left = deadline - time.monotonic()
        if left <= 0 or not self.coming():
          break
        try:
          item = self.queue.get(timeout=min(left, 0.001))
        except queue.Empty:
          continue
      if item is None:
        self.queue.put(None)  # close after this batch
        break
      items.append(item)
    return items

  def _loop(self):
    while (first := self.queue.get()) is not None:
      items = self._gather(first)
      try:
        probs = self.predictor.probs_batch(*self.predictor.stack([s for s, _ in items]))
        for i, (_, future) in enumerate(items):
          future.set_result({t: p[i] for t, p in probs.items()})
      except Exception as e:  # pylint: disable=broad-except  (the device call failed: tell all)
        for _, future in items:
          future.set_exception(e)
      self.batches += 1
      self.samples += len(items)


# ----------------------------------------------------------------------------- the app


def buckets_for(max_batch: int) -> tuple[int, ...]:
  return tuple(sorted({b for b in BUCKETS if b < max_batch} | {max_batch}))


class Server:
  """The state behind the routes: predictor, batcher, decode pool, model card, limits."""

  def __init__(self, bundle: str, *, max_batch: int = 32, max_wait_ms: float = 5.0,
               top_k: int = 5, allow_paths: bool = False, max_body_mb: float = 20.0,
               max_pixels: float = 50e6, decode_threads: int = 0, consistency: str = "ancestor"):
    if max_batch < 1 or max_wait_ms < 0 or max_body_mb <= 0 or max_pixels <= 0:
      raise ValueError("--max_batch must be >= 1, --max_wait_ms >= 0, --max_body_mb and "
                       "--max_pixels > 0")
    self.predictor = predictor_lib.Predictor.from_bundle(
        bundle, buckets=buckets_for(max_batch), top_k=top_k, consistency=consistency)
    self.card = card_lib.read_or_build(bundle)
    self.allow_paths, self.max_batch = allow_paths, max_batch
    self.max_body, self.max_pixels = int(max_body_mb * 2**20), int(max_pixels)
    Image.MAX_IMAGE_PIXELS = self.max_pixels  # PIL refuses twice that already when opening
    self.max_instances = 8 * max_batch
    self.decoding = 0  # samples of accepted requests not yet submitted to the batcher
    self.batcher = Batcher(self.predictor, max_batch, max_wait_ms / 1000,
                           coming=lambda: self.decoding)
    self.pool = concurrent.futures.ThreadPoolExecutor(decode_threads or os.cpu_count() or 2,
                                                      thread_name_prefix="decode")
    self.ready, self.requests, self.compile_s = False, 0, None

  def warm_up(self) -> None:
    """Compiles the forward pass for every bucket; then /health says ready."""
    t0 = time.time()
    for b in self.predictor.buckets:
      self.predictor.probs_batch(*self.predictor.stack(
          [self.predictor.prepare(np.zeros((8, 8, 3), np.uint8))] * b))
    self.compile_s, self.ready = time.time() - t0, True
    print(f"ready: compiled buckets {', '.join(map(str, self.predictor.buckets))} in "
          f"{self.compile_s:.1f} s", flush=True)

  def prepare(self, image, meta: dict):
    """In the decode pool: bytes or a path -> `Predictor.prepare`d sample, or why not."""
    if isinstance(image, str):
      try:
        with open(image, "rb") as f:
          image = f.read()
      except OSError as e:
        return f"cannot be read from this server's disk ({e.strerror or _message(e)})"
    problem = image_problem(image, self.max_pixels)
    if problem:
      return problem
    try:  # decoded here, not by `Predictor.prepare`, to word its failure like the others
      pixels = preprocessing.to_rgb_uint8(image, self.predictor.size)
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
      return f"cannot decode ({_message(e)})"
    return self.predictor.prepare(pixels, meta)

  async def predict(self, request):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await self._body(request)
    if ctype == "application/json":
      instances, top_k, problems = parse_json(body, self.allow_paths, self.max_instances)
    elif ctype == "multipart/form-data":
      instances, top_k, problems = await parse_multipart(request, body)
    else:
      raise RequestError(415, [f"content type {ctype or 'none'!r} is not accepted: send "
                               "application/json or multipart/form-data"])
    # Every image that could be had is decoded, also when the request is already refused, so
    # that the answer names all of each instance's problems at once.
    todo = [one for one in instances if one.image is not None]
    loop = asyncio.get_running_loop()
    self.decoding += len(todo)
    try:
      samples = await asyncio.gather(*(loop.run_in_executor(self.pool, self.prepare, one.image,
                                                            one.meta) for one in todo))
      for one, s in zip(todo, samples):
        if isinstance(s, str):
          one.problems.append(f"{one.where}: image: {s}")
      problems += [p for one in instances for p in one.problems]
      if problems:
        raise RequestError(422, problems)
      futures = [asyncio.wrap_future(self.batcher.submit(s)) for s in samples]
    finally:
      self.decoding -= len(todo)
    probs = await asyncio.gather(*futures)
    self.requests += 1
    return {"predictions": [self.predictor.result(one.name, p, s[3], None, top_k)
                            for one, s, p in zip(instances, samples, probs)]}

  async def _body(self, request) -> bytes:
    """The body, refused (413) past `max_body` bytes, by its header or as it streams in. The
    rest of a refused body is read and dropped, up to `DISCARD_MAX` bytes, so that the client
    gets the answer rather than a reset connection."""
    limit = f"over this server's limit of {self.max_body / 2**20:g} MiB (--max_body_mb)"
    declared = request.headers.get("content-length", "")
    refused = None
    if declared.isdigit() and int(declared) > self.max_body:
      refused = [f"request body of {int(declared) / 2**20:.1f} MiB is {limit}"]
      if int(declared) > self.max_body + DISCARD_MAX:
        raise RequestError(413, refused, close=True)
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if refused is None and size > self.max_body:
        refused, chunks = [f"request body is {limit}"], []
      if refused is None:
        chunks.append(chunk)
      elif size > self.max_body + DISCARD_MAX:
        raise RequestError(413, refused, close=True)
    if refused:
      raise RequestError(413, refused)
    return b"".join(chunks)

  def health(self) -> dict:
    b = self.batcher
    return {"status": "ready" if self.ready else "starting", "requests": self.requests,
            "batches": b.batches, "samples": b.samples, "max_batch": self.max_batch,
            "buckets": list(self.predictor.buckets), "compile_s": self.compile_s}

  def close(self) -> None:
    self.batcher.close()
    self.pool.shutdown()


def make_app(server: Server):
  """The Starlette app over `server`; warms up in a thread once it is serving."""
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top

  def error(status: int, problems: list[str], close: bool = False):
    return JSONResponse({"error": "; ".join(problems), "problems": problems}, status,
                        headers={"connection": "close"} if close else None)

  async def predict(request):
    if not server.ready:
      return error(503, ["the model is still compiling: retry when GET /health says ready"])
    try:
      return JSONResponse(await server.predict(request))
    except RequestError as e:
      return error(e.status, e.problems, e.close)

  async def info(request):
    del request
    return JSONResponse(server.card)

  async def health(request):
    del request
    return JSONResponse(server.health(), 200 if server.ready else 503)

  async def not_found(request, exc):
    return error(exc.status_code, [f"{request.method} {request.url.path}: {exc.detail} "
                                   "(endpoints: POST /predict, GET /info, GET /health)"])

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    threading.Thread(target=server.warm_up, name="warm-up", daemon=True).start()
    yield
    server.close()
    h = server.health()
    print(f"stopped: {h['requests']} requests served, {h['samples']} images in {h['batches']} "
          "device calls", flush=True)

  return Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                           Route("/info", info, methods=["GET"]),
                           Route("/health", health, methods=["GET"])],
                   exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  try:
    import python_multipart  # pylint: disable=g-import-not-at-top,unused-import
    import starlette  # pylint: disable=g-import-not-at-top,unused-import
    import uvicorn  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    cli.fail(f"the server needs starlette, uvicorn and python-multipart ({e.name} is missing): "
             "pip install -e '.[serve]'")
  f = flags.FLAGS
  sock = cli.call(bind, f.host, f.port)  # before the model loads: a bad address fails at once
  server = cli.call(Server, f.bundle, max_batch=f.max_batch, max_wait_ms=f.max_wait_ms,
                    top_k=f.top_k, allow_paths=f.allow_paths, max_body_mb=f.max_body_mb,
                    max_pixels=f.max_pixels, decode_threads=f.decode_threads,
                    consistency=f.consistency)
  config = uvicorn.Config(make_app(server), log_level=f.log_level,
                          timeout_graceful_shutdown=f.graceful_shutdown_s)
  sock.listen(config.backlog)  # before the warm-up starts: "ready" means reachable
  print(f"serving {f.bundle} on http://{f.host}:{f.port} (max_batch {f.max_batch}, max_wait "
        f"{f.max_wait_ms:g} ms, buckets {', '.join(map(str, server.predictor.buckets))}); "
        "compiling...", flush=True)
  userver = uvicorn.Server(config)
  userver.run(sockets=[sock])
  if not userver.started:  # uvicorn has said why
    sys.exit(3)


def bind(host: str, port: int) -> socket.socket:
  """A TCP socket bound to host:port (not yet listening), as uvicorn would make it; ValueError
  naming the address and the reason when that is impossible (a port outside 1..65535, an
  address that is not this machine's, a port in use or reserved)."""
  if not 1 <= port <= 65535:
    raise ValueError(f"--port={port} is not a TCP port (1..65535)")
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    hint = {errno.EADDRINUSE: " (another process listens there)",
            errno.EADDRNOTAVAIL: " (not an address of this machine)",
            errno.EACCES: " (ports below 1024 need privileges)"}.get(e.errno, "")
    raise ValueError(f"cannot listen on --host={host} --port={port}: "
                     f"{e.strerror or _message(e)}{hint}") from None
  return sock


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("bundle", None, "an exported bundle (python -m linnaeus_jax.export)")
  flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
  flags.DEFINE_integer("port", 8000, "port to listen on")
  flags.DEFINE_integer("max_batch", 32, "most images in one device call")
  flags.DEFINE_float("max_wait_ms", 5.0, "longest wait for more requests to fill a device call")
  flags.DEFINE_integer("top_k", 5, "classes per rank when a request does not say")
  flags.DEFINE_bool("allow_paths", False, "accept image_path (files on the server's disk)")
  flags.DEFINE_float("max_body_mb", 20.0, "largest request body, MiB")
  flags.DEFINE_float("max_pixels", 50e6, "largest image, pixels (decompression bombs refused)")
  flags.DEFINE_integer("decode_threads", 0, "image decoding threads (0: one per core)")
  flags.DEFINE_enum("consistency", "ancestor", list(predictor_lib.CONSISTENCY),
                    "hierarchical consistency of the ranks (docs/inference.md)")
  flags.DEFINE_string("log_level", "warning", "uvicorn's log level (info logs every request)")
  flags.DEFINE_float("graceful_shutdown_s", 30.0, "after SIGTERM, longest wait for requests")
  flags.mark_flag_as_required("bundle")


if __name__ == "__main__":
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run(main)
