"""Input-pipeline throughput: Grain batches per second from the synthetic dataset.

    python benchmarks/input_pipeline.py [--img_size=64] [--batch=64] [--batches=50]
        [--threads=4] [--workers=0,1]

Prints one row per worker count: images per second and milliseconds per batch, for JPEG folders
and images.h5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax import config as config_lib  # noqa: E402
from linnaeus_jax.data import labels, pipeline, synthetic  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--img_size", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--threads", type=int, default=4)
  p.add_argument("--workers", default="0,1")
  a = p.parse_args()
  print("| images | workers | threads | batch | img/s | ms/batch |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("jpeg", "h5"):
      opts = synthetic.SyntheticOptions(img_size=a.img_size, image_format=fmt)
      paths = synthetic.generate(os.path.join(tmp, fmt), opts, verbose=False)
      c = config_lib.base_config()
      c.data.h5.labels_path = paths["labels_path"]
      if fmt == "jpeg":
        c.data.hybrid.use_hybrid, c.data.hybrid.images_dir = True, paths["images_dir"]
      else:
        c.data.h5.images_path = paths["images_path"]
      c.data.img_size, c.data.batch_size = a.img_size, a.batch
      c.data.meta.components.ELEVATION.enabled = True
      c.data.partial.levels = True
      c.data.prefetch_threads = a.threads
      data = labels.load(c)
      for workers in (int(w) for w in a.workers.split(",")):
        c.data.num_workers = workers
        it = iter(pipeline.train_dataset(data, c, a.batches + 5))
        for _ in range(5):  # warm-up (worker start)
          next(it)
        t0 = time.time()
        for _ in range(a.batches):
          next(it)
        dt = (time.time() - t0) / a.batches
        print(f"| {fmt} | {workers} | {a.threads} | {a.batch} | {a.batch / dt:,.0f} | "
              f"{1000 * dt:.1f} |", flush=True)


if __name__ == "__main__":
  main()
