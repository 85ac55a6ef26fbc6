"""The prediction server under load: requests/s and latency with and without dynamic batching.

    python benchmarks/serve.py [--bundle=BUNDLE] [--clients=1,8,32] [--seconds=10]
        [--max_batch=32] [--max_wait_ms=5]

Without `--bundle`, trains configs/demo.py for 20 steps in a temp folder and exports it (the demo
bundle; the numbers depend on the model, not on how well it is trained). For each server
(`python -m linnaeus_jax.serve`: dynamic batching at `max_batch` / `max_wait_ms`, then
`max_batch=1`) and each number of clients, N threads each send one-image JSON requests (a
synthetic 64 px JPEG with full metadata, as base64) back to back over keep-alive loopback
connections for `seconds`. Rows: requests/s, p50/p99 latency, mean images per device call (the
server's counters) and whether every request was answered exactly once (each client's 200s
against the server's count). Clients and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import base64
import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"lat": 45.5, "lon": -73.6, "datetime_utc": "2021-06-01T10:00:00Z", "elevation_m": 30.0}


def demo_bundle(tmp: str) -> tuple[str, str]:
  """(bundle, images folder) of configs/demo.py trained for 20 steps in `tmp`."""
  workdir, bundle = os.path.join(tmp, "run"), os.path.join(tmp, "bundle")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  platform = {"gpu": "cuda"}.get(env["JAX_PLATFORMS"], env["JAX_PLATFORMS"])  # of the forward
  for cmd in (["linnaeus_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
               "--config.train.steps=20", "--config.schedule.validation.interval_fraction=1.0",
               f"--config.data.synthetic.cache_dir={os.path.join(tmp, 'data')}"],
              ["linnaeus_jax.export", f"--workdir={workdir}", f"--out={bundle}",
               f"--platforms={platform}"]):
    print("$ python -m " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return bundle, json.load(f)["data"]["hybrid"]["images_dir"]


def start(bundle: str, max_batch: int, max_wait_ms: float):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "linnaeus_jax.serve", f"--bundle={bundle}",
                           f"--port={port}", f"--max_batch={max_batch}",
                           f"--max_wait_ms={max_wait_ms}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while time.time() - t0 < 300:
    if proc.poll() is not None:
      raise RuntimeError(proc.communicate()[0][-3000:])
    try:
      if get(port, "/health")[0] == 200:
        return proc, port
    except OSError:
      time.sleep(0.2)
  raise TimeoutError("the server did not become ready in 300 s")


def get(port: int, path: str):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  conn.request("GET", path)
  r = conn.getresponse()
  return r.status, json.loads(r.read())


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
  """`clients` threads posting `bodies` in turn for `seconds`: latencies and counts."""
  latencies, statuses, lock = [], [], threading.Lock()
  stop_at = time.perf_counter() + seconds

  def client(i):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    mine, codes, k = [], [], i
    while time.perf_counter() < stop_at:
      t0 = time.perf_counter()
      conn.request("POST", "/predict", bodies[k % len(bodies)],
                   {"Content-Type": "application/json"})
      r = conn.getresponse()
      r.read()
      mine.append(time.perf_counter() - t0)
      codes.append(r.status)
      k += clients
    with lock:
      latencies.extend(mine)
      statuses.extend(codes)
  before = get(port, "/health")[1]
  t0 = time.perf_counter()
  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  after = get(port, "/health")[1]
  ok = sum(s == 200 for s in statuses)
  served = after["requests"] - before["requests"]
  batches = after["batches"] - before["batches"]
  return {"requests": len(statuses), "req_s": ok / wall,
          "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
          "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
          "mean_batch": (after["samples"] - before["samples"]) / max(batches, 1),
          "once": ok == len(statuses) == served == after["samples"] - before["samples"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bundle", default="")
  ap.add_argument("--images", default="", help="folder of .jpg files (default: the demo's)")
  ap.add_argument("--clients", default="1,8,32")
  ap.add_argument("--seconds", type=float, default=10.0)
  ap.add_argument("--max_batch", type=int, default=32)
  ap.add_argument("--max_wait_ms", type=float, default=5.0)
  a = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    bundle, images = (a.bundle, a.images) if a.bundle else demo_bundle(tmp)
    paths = sorted(glob.glob(os.path.join(images, "*.jpg")))[:64]
    if not paths:
      sys.exit(f"no .jpg images in {images!r}: pass --images")
    bodies = [json.dumps({"instances": [{"image_b64": base64.b64encode(
        open(p, "rb").read()).decode(), **META}], "top_k": 3}).encode() for p in paths]
    print(f"{os.cpu_count()} cores; {a.seconds:g} s per row; one image per request\n")
    print("| server | clients | requests | req/s | p50 ms | p99 ms | images per device call | "
          "each answered once |\n|---|---|---|---|---|---|---|---|", flush=True)
    rates = {}
    for max_batch, wait in ((a.max_batch, a.max_wait_ms), (1, 0.0)):
      proc, port = start(bundle, max_batch, wait)
      name = f"max_batch={max_batch}, max_wait_ms={wait:g}"
      try:
        for n in (int(c) for c in a.clients.split(",")):
          r = load(port, bodies, n, a.seconds)
          rates[(max_batch, n)] = r["req_s"]
          print(f"| {name} | {n} | {r['requests']:,} | {r['req_s']:,.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {'yes' if r['once'] else 'NO'} |",
                flush=True)
      finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    n = max(int(c) for c in a.clients.split(","))
    print(f"\ndynamic batching / max_batch=1 at {n} clients: "
          f"{rates[(a.max_batch, n)] / rates[(1, n)]:.2f}x")


if __name__ == "__main__":
  main()
