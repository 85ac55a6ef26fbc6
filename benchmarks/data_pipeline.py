"""Input-pipeline throughput against the bare decode+resize loop on the same files.

    python benchmarks/data_pipeline.py [--src_size=320] [--img_size=224] [--rows=1500]
        [--batch=32] [--workers=1,2] [--threads=1]
        [--formats=jpeg,shards,h5] [--shard_size=500] [--rounds=1]

Generates a synthetic dataset with `src_size` images (JPEG folder and images.h5; `shards`: the
folder's JPEGs packed by `shards.pack` in labels.h5 row order, bytes unchanged), then per image
source: the bare loop (one process: read + decode + RGB + area resize, nothing else) and the Grain
training pipeline with W worker processes (sampler, labels, metadata, batching, IPC). Reports
images/s and the pipeline's throughput per worker relative to the bare loop; with `--rounds`,
the best of several rounds, the formats interleaved (a fairer comparison on a shared machine).
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
from linnaeus_jax.data import images, labels, pipeline, shards, synthetic  # noqa: E402


def pack_folder(paths: dict, out: str, shard_size: int) -> str:
  """The glob of the folder's images packed into shards, rows in labels.h5 order."""
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(paths["labels_path"], "r") as h5:
    ids = h5["img_identifiers"][:]
  files = [images.file_path(paths["images_dir"], i, ".jpg") for i in ids]
  shards.pack(files, out, shard_size=shard_size, progress=False)
  return os.path.join(out, "images-*.h5")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--src_size", type=int, default=320)
  p.add_argument("--img_size", type=int, default=224)
  p.add_argument("--rows", type=int, default=1500)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--threads", type=int, default=1, help="Grain reader threads per worker")
  p.add_argument("--formats", default="jpeg,shards,h5")
  p.add_argument("--shard_size", type=int, default=500)
  p.add_argument("--rounds", type=int, default=1,
                 help="measure every loop this many times, formats interleaved; report the best")
  a = p.parse_args()
  print(f"source {a.src_size}px -> {a.img_size}px, batch {a.batch}, {a.threads} reader "
        f"thread(s) per worker, {os.cpu_count()} CPUs, best of {a.rounds} round(s)")
  per_species = max(1, a.rows // 48)
  worker_counts = [int(w) for w in a.workers.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    generated, setups = {}, []
    for fmt in a.formats.split(","):
      src = "h5" if fmt == "h5" else "jpeg"
      if src not in generated:
        opts = synthetic.SyntheticOptions(img_size=a.src_size, image_format=src,
                                          max_samples_per_species=per_species,
                                          min_samples_per_species=per_species)
        generated[src] = synthetic.generate(os.path.join(tmp, src), opts, verbose=False)
      paths = generated[src]
      c = config_lib.base_config()
      c.data.h5.labels_path = paths["labels_path"]
      if fmt == "jpeg":
        c.data.hybrid.use_hybrid, c.data.hybrid.images_dir = True, paths["images_dir"]
      elif fmt == "shards":
        c.data.h5.images_path = pack_folder(paths, os.path.join(tmp, "shards"), a.shard_size)
      else:
        c.data.h5.images_path = paths["images_path"]
      c.data.img_size, c.data.batch_size = a.img_size, a.batch
      c.data.partial.levels = True
      c.data.meta.components.ELEVATION.enabled = True
      c.data.prefetch_threads = a.threads
      c.aug.autoaug.policy = "none"
      setups.append((fmt, c, labels.load(c)))
    best: dict[tuple[str, int], float] = {}  # (format, workers; -1: bare loop) -> img/s
    for r in range(a.rounds):
      for fmt, c, data in setups:
        reader = images.ImageReader(data.train_images, a.img_size)
        t0 = time.time()
        for row, i in zip(data.train.raw_row, data.train.image_id):
          reader(int(row), i)
        ips = {-1: len(data.train) / (time.time() - t0)}
        n_batches = len(data.train) // a.batch
        for workers in worker_counts:
          c.data.num_workers = workers
          it = iter(pipeline.train_dataset(data, c, n_batches + 4))
          for _ in range(4):  # worker start-up
            next(it)
          t0 = time.time()
          for _ in range(n_batches):
            next(it)
          ips[workers] = n_batches * a.batch / (time.time() - t0)
        for w, v in ips.items():
          best[fmt, w] = max(best.get((fmt, w), 0.0), v)
        print(f"round {r}, {fmt}: " + ", ".join(f"{v:,.0f}" for v in ips.values()) + " img/s",
              file=sys.stderr, flush=True)
  print("| images | loop | img/s | per worker vs bare |")
  print("|---|---|---|---|")
  for fmt, _, _ in setups:
    bare = best[fmt, -1]
    print(f"| {fmt} | bare decode+resize | {bare:,.0f} | 1.00 |")
    for w in worker_counts:
      label = f"grain, {w} worker(s)" if w else "grain, in-process"
      print(f"| {fmt} | {label} | {best[fmt, w]:,.0f} | {best[fmt, w] / max(w, 1) / bare:.2f} |")


if __name__ == "__main__":
  main()
