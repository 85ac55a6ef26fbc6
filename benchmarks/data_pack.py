"""Packing throughput: `shards.pack` against the disk-read + copy bound on the same files.

    python benchmarks/data_pack.py [--files=10000] [--distinct=500] [--shard_size=2500]
        [--workers=0] [--max_side=0] [--rounds=2] [--decode=2000] [--dir=TMP]

Generates `files` JPEGs once into a temporary folder (`distinct` pictures, 500 px on the long
side, 333-375 on the short, smooth colour noise at quality 90: 50-100 KB each, like iNat's
'medium' images; repeated under new names). Per round: the bound (one thread reads every file
and appends its bytes to one plain file) and `shards.pack` with each `max_side` (0: bytes copied;
> 0: images decoded, shrunk and re-encoded, CPU-bound, for information). Files come from the page
cache (written just before); nothing is fsynced inside a timed loop, but every loop starts after
`os.sync()`, so that none pays for writing back another's pages. Then reading back, in one
random order: every image's bytes from the folder (open + read) and from the shards
(`ShardReader.encoded`, a fresh reader each round), and `--decode` of them decoded and resized
to 224 px by `ImageReader` from each. Reports the fastest round: MB/s and files/s, pack / bound
and shards / folder.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax.data import images, shards  # noqa: E402


def make_jpegs(folder: str, files: int, distinct: int, seed: int = 0) -> list[str]:
  """`files` JPEG paths in `folder`, cycling through `distinct` generated pictures."""
  rng = np.random.default_rng(seed)
  blobs = []
  for _ in range(min(distinct, files)):
    short = int(rng.integers(333, 376))
    w, h = (500, short) if rng.random() < 0.7 else (short, 500)
    down = int(rng.integers(4, 7))
    low = rng.integers(0, 256, (h // down + 1, w // down + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    blobs.append(buf.getvalue())
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(files):
    paths.append(os.path.join(folder, f"{i:07d}.jpg"))
    with open(paths[-1], "wb") as f:
      f.write(blobs[i % len(blobs)])
  return paths


def copy_bound(paths: list[str], out: str) -> float:
  """Seconds to read every file and append its bytes to one plain file."""
  t0 = time.perf_counter()
  with open(out, "wb") as dst:
    for p in paths:
      with open(p, "rb") as src:
        dst.write(src.read())
  return time.perf_counter() - t0


def read_back(paths: list[str], files: list[str], decode: int, seed: int) -> dict[str, float]:
  """Seconds to read every image's bytes (and decode `decode` of them) in one random order, from
  the folder and from the shards."""
  order = np.random.default_rng(seed).permutation(len(paths))
  out = {}
  t0 = time.perf_counter()
  for i in order:
    with open(paths[i], "rb") as f:
      f.read()
  out["folder, bytes"] = time.perf_counter() - t0
  reader = shards.ShardReader(files)
  t0 = time.perf_counter()
  for i in order:
    reader.encoded(int(i))
  out["shards, bytes"] = time.perf_counter() - t0
  folder = os.path.dirname(paths[0])
  for name, r in (("folder", images.ImageReader(folder, 224)),
                  ("shards", images.ImageReader(",".join(files), 224))):
    t0 = time.perf_counter()
    for i in order[:decode]:
      r(int(i), os.path.basename(paths[i]))
    out[f"{name}, decoded to 224 px"] = time.perf_counter() - t0
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--files", type=int, default=10_000)
  p.add_argument("--distinct", type=int, default=500)
  p.add_argument("--shard_size", type=int, default=2_500)
  p.add_argument("--workers", type=int, default=0, help="pack's reading threads (0: per CPU)")
  p.add_argument("--max_side", default="0")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--decode", type=int, default=2000, help="images decoded per read round")
  p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
  a = p.parse_args()
  tmp = tempfile.mkdtemp(dir=a.dir)
  try:
    t0 = time.perf_counter()
    paths = make_jpegs(os.path.join(tmp, "jpegs"), a.files, a.distinct)
    total = sum(os.path.getsize(x) for x in paths)
    print(f"{a.files} files, {total / 1e6:,.0f} MB ({total / a.files / 1e3:.0f} KB each), "
          f"generated in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs; shard_size "
          f"{a.shard_size}", flush=True)
    best: dict[str, float] = {}
    sizes: dict[str, int] = {}
    reads: dict[str, float] = {}
    for r in range(a.rounds):
      os.sync()  # each timed loop starts without the previous one's dirty pages to write back
      s = copy_bound(paths, os.path.join(tmp, "bound.bin"))
      os.remove(os.path.join(tmp, "bound.bin"))
      best["bound"] = min(best.get("bound", s), s)
      sizes["bound"] = total
      print(f"round {r}: bound {s:.2f} s", flush=True)
      for m in (int(x) for x in a.max_side.split(",")):
        out = os.path.join(tmp, f"shards{m}")
        os.sync()
        t0 = time.perf_counter()
        files = shards.pack(paths, out, shard_size=a.shard_size, max_side=m, progress=False,
                            num_workers=a.workers)
        s = time.perf_counter() - t0
        key = f"pack, max_side {m}"
        best[key] = min(best.get(key, s), s)
        sizes[key] = sum(os.path.getsize(f) for f in files)
        print(f"round {r}: {key} {s:.2f} s ({len(files)} shards, "
              f"{sizes[key] / 1e6:,.0f} MB)", flush=True)
        if m == 0:
          for key, s in read_back(paths, files, a.decode, seed=r).items():
            reads[key] = min(reads.get(key, s), s)
        shutil.rmtree(out)
    print("| loop | s | MB/s (source) | files/s | vs bound |")
    print("|---|---|---|---|---|")
    for key, s in best.items():
      print(f"| {key} | {s:.2f} | {total / s / 1e6:,.0f} | {a.files / s:,.0f} | "
            f"{best['bound'] / s:.2f} |")
    if reads:
      print("\n| read, random order | images | s | images/s | shards vs folder |")
      print("|---|---|---|---|---|")
      for key, s in reads.items():
        n = a.files if key.endswith("bytes") else min(a.decode, a.files)
        if not n:
          continue
        ref = reads[key.replace("shards", "folder")]
        print(f"| {key} | {n} | {s:.2f} | {n / s:,.0f} | {ref / s:.2f} |")
  finally:
    shutil.rmtree(tmp)


if __name__ == "__main__":
  main()
