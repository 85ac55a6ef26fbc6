"""Inference throughput: images/s per batch size, for the Predictor and the exported artifact.

    python benchmarks/inference.py --bundle=BUNDLE [--batch_sizes=1,8,32] [--repeats=3]
    python benchmarks/inference.py --workdir=runs/demo   # exports a bundle to a temp folder

Rows: `predictor` = `Predictor.predict` on in-memory uint8 images with full metadata (decode and
resize excluded: arrays already at the model's size; metadata encoding, padding, softmax,
top-k and the consistency pass included); `exported` = `jax.jit(exp.call)` of `model.jax_exported` from a bare
`jax.export.deserialize`, on the same preprocessed batch (the forward pass alone). Each number is
the best of `repeats` timed calls after one warm-up call (which compiles).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax.inference import export  # noqa: E402
from linnaeus_jax.inference.predictor import Predictor  # noqa: E402

META = {"lat": 45.5, "lon": -73.6, "datetime_utc": "2021-06-01T10:00:00Z", "elevation_m": 30.0}


def best_of(fn, repeats: int) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--bundle")
  ap.add_argument("--workdir")
  ap.add_argument("--batch_sizes", default="1,8,32")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  if bool(args.bundle) == bool(args.workdir):
    ap.error("give exactly one of --bundle and --workdir")
  path = args.bundle
  if args.workdir:
    path = os.path.join(tempfile.mkdtemp(), "bundle")
    export.export_workdir(args.workdir, path, platforms=(jax.default_backend(),))
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  pred = Predictor.from_bundle(path, buckets=sizes)
  exp = jax.export.deserialize(bytearray(open(os.path.join(path, "model.jax_exported"),
                                              "rb").read()))
  call = jax.jit(exp.call)  # compiled once per batch shape, as a serving loop would
  params = {k: jax.device_put(v) for k, v in np.load(os.path.join(path, "params.npz")).items()}
  rng = np.random.default_rng(0)
  s = pred.size
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; image {s}px; "
        f"{sum(v.size for v in params.values()):,} parameters; best of {args.repeats}")
  print("| batch | predictor img/s | predictor ms/batch | exported img/s | exported ms/batch |")
  print("|---|---|---|---|---|")
  for b in sizes:
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(b)]
    meta = [META] * b
    images_u8, m, valid, _, _ = pred.preprocess(images, meta)
    t_pred = best_of(lambda: pred.predict(images, meta), args.repeats)
    t_exp = best_of(lambda: jax.block_until_ready(call(params, images_u8, m, valid)),
                    args.repeats)
    print(f"| {b} | {b / t_pred:.1f} | {1000 * t_pred:.1f} | {b / t_exp:.1f} | "
          f"{1000 * t_exp:.1f} |", flush=True)


if __name__ == "__main__":
  main()
