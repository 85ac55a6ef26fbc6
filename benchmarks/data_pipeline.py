"""Input-pipeline throughput against the bare decode+resize loop on the same files.

    python benchmarks/data_pipeline.py [--src_size=320] [--img_size=224] [--rows=1500]
        [--batch=32] [--workers=1,2] [--threads=1]
        [--formats=jpeg,h5]

Generates a synthetic dataset with `src_size` images (JPEG folder and images.h5), then per image
source: the bare loop (one process: read + decode + RGB + area resize, nothing else) and the Grain
training pipeline with W worker processes (sampler, labels, metadata, batching, IPC). Reports
images/s and the pipeline's throughput per worker relative to the bare loop.
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
from linnaeus_jax.data import images, labels, pipeline, synthetic  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--src_size", type=int, default=320)
  p.add_argument("--img_size", type=int, default=224)
  p.add_argument("--rows", type=int, default=1500)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--threads", type=int, default=1, help="Grain reader threads per worker")
  p.add_argument("--formats", default="jpeg,h5")
  a = p.parse_args()
  print(f"source {a.src_size}px -> {a.img_size}px, batch {a.batch}, {a.threads} reader "
        f"thread(s) per worker, {os.cpu_count()} CPUs")
  print("| images | loop | img/s | per worker vs bare |")
  print("|---|---|---|---|")
  per_species = max(1, a.rows // 48)
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in a.formats.split(","):
      opts = synthetic.SyntheticOptions(img_size=a.src_size, image_format=fmt,
                                        max_samples_per_species=per_species,
                                        min_samples_per_species=per_species)
      paths = synthetic.generate(os.path.join(tmp, fmt), opts, verbose=False)
      c = config_lib.base_config()
      c.data.h5.labels_path = paths["labels_path"]
      if fmt == "jpeg":
        c.data.hybrid.use_hybrid, c.data.hybrid.images_dir = True, paths["images_dir"]
      else:
        c.data.h5.images_path = paths["images_path"]
      c.data.img_size, c.data.batch_size = a.img_size, a.batch
      c.data.partial.levels = True
      c.data.meta.components.ELEVATION.enabled = True
      c.data.prefetch_threads = a.threads
      c.aug.autoaug.policy = "none"
      data = labels.load(c)
      loc = data.train_images
      reader = images.ImageReader(loc, a.img_size)
      t0 = time.time()
      for r, i in zip(data.train.raw_row, data.train.image_id):
        reader(int(r), i)
      bare = len(data.train) / (time.time() - t0)
      print(f"| {fmt} | bare decode+resize | {bare:,.0f} | 1.00 |", flush=True)
      n_batches = len(data.train) // a.batch
      for workers in (int(w) for w in a.workers.split(",")):
        c.data.num_workers = workers
        it = iter(pipeline.train_dataset(data, c, n_batches + 4))
        for _ in range(4):  # worker start-up
          next(it)
        t0 = time.time()
        for _ in range(n_batches):
          next(it)
        ips = n_batches * a.batch / (time.time() - t0)
        label = f"grain, {workers} worker(s)" if workers else "grain, in-process"
        print(f"| {fmt} | {label} | {ips:,.0f} | {ips / max(workers, 1) / bare:.2f} |",
              flush=True)


if __name__ == "__main__":
  main()
