"""Cost of `python -m linnaeus_jax.data.build` on an iNat-2021-sized train JSON.

    python benchmarks/data_build.py [--n=2700000] [--species=10000] [--dir=/tmp/...]

Generates a train JSON in the iNat 2021 layout (images with date, latitude, longitude, 3% of the
coordinates NaN as in the real file; categories with the full lineage; annotations) with N
images once (reused when present), builds it without images (no --check_images) in a fresh
process, and prints generation time, build time, the build's peak resident memory (ru_maxrss of
the child, and a 0.2 s RSS sampler as a cross-check) and rows/s. Target: 2.7M rows in under
3 minutes and 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lineage(species: int, rng: np.random.Generator) -> list[dict]:
  """Categories: `species` species over a taxonomy shaped like iNat 2021's (10k species:
  ~4900 genera, ~1100 families, ~270 orders, ~50 classes, ~13 phyla, 3 kingdoms)."""
  sizes = {"genus": species * 49 // 100, "family": species * 11 // 100,
           "order": species * 27 // 1000, "class": max(species // 200, 1),
           "phylum": max(species * 13 // 10000, 1), "kingdom": 3}
  ranks = ("genus", "family", "order", "class", "phylum", "kingdom")
  parent = {}  # rank -> index of the parent of each taxon at that rank
  for child, up in zip(ranks, ranks[1:]):
    parent[child] = rng.integers(0, sizes[up], sizes[child])
  genus_of = rng.integers(0, sizes["genus"], species)
  cats = []
  for s in range(species):
    idx = {"genus": int(genus_of[s])}
    for child, up in zip(ranks, ranks[1:]):
      idx[up] = int(parent[child][idx[child]])
    names = {r: f"{r.capitalize()}{idx[r]}" for r in ranks}
    epithet = f"epithet{s}"
    cats.append({"id": s, "name": f"{names['genus']} {epithet}", "common_name": f"Common {s}",
                 "supercategory": names["kingdom"], "kingdom": names["kingdom"],
                 "phylum": names["phylum"], "class": names["class"], "order": names["order"],
                 "family": names["family"], "genus": names["genus"],
                 "specific_epithet": epithet,
                 "image_dir_name": f"{s:05d}_{names['kingdom']}_{names['genus']}_{epithet}"})
  return cats


def generate(path: str, n: int, species: int, seed: int = 0) -> None:
  """Writes the JSON in blocks of formatted text (json.dump of 2.7M dicts would need ~3 GB)."""
  rng = np.random.default_rng(seed)
  cats = lineage(species, rng)
  cat = rng.integers(0, species, n)
  lat, lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
  nan = rng.random(n) < 0.03
  stamp = rng.integers(1_262_304_000, 1_609_459_200, n)  # 2010..2020, seconds
  hex_ = rng.integers(0, 2**63, (n, 2), dtype=np.int64)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write('{"info": {"year": 2021, "version": "benchmark"}, "images": [')
    for a in range(0, n, 100_000):
      rows = []
      for i in range(a, min(a + 100_000, n)):
        d = time.gmtime(int(stamp[i]))
        la, lo = ("NaN", "NaN") if nan[i] else (f"{lat[i]:.5f}", f"{lon[i]:.5f}")
        rows.append(
            f'{{"id": {i}, "width": 500, "height": 375, "file_name": "train/'
            f'{cats[cat[i]]["image_dir_name"]}/{hex_[i, 0]:016x}{hex_[i, 1]:016x}.jpg", '
            f'"license": 0, "rights_holder": "user {i % 9973}", "date": '
            f'"{d.tm_year:04d}-{d.tm_mon:02d}-{d.tm_mday:02d} {d.tm_hour:02d}:{d.tm_min:02d}:00'
            f'+00:00", "latitude": {la}, "longitude": {lo}, "location_uncertainty": 10}}')
      f.write((", " if a else "") + ", ".join(rows))
    f.write('], "categories": ' + json.dumps(cats) + ', "annotations": [')
    for a in range(0, n, 200_000):
      f.write((", " if a else "") + ", ".join(
          f'{{"id": {i}, "image_id": {i}, "category_id": {cat[i]}}}'
          for i in range(a, min(a + 200_000, n))))
    f.write('], "licenses": []}')
  os.replace(tmp, path)


def sample_rss(pid: int, peak: list, stop: threading.Event) -> None:
  while not stop.is_set():
    try:
      with open(f"/proc/{pid}/status") as f:
        for line in f:
          if line.startswith("VmRSS:"):
            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
    except OSError:
      return
    stop.wait(0.2)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=2_700_000)
  p.add_argument("--species", type=int, default=10_000)
  p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "linnaeus_jax_data_build"))
  args = p.parse_args()
  folder = os.path.join(args.dir, f"inat2021_n{args.n}_s{args.species}")
  os.makedirs(folder, exist_ok=True)
  source = os.path.join(folder, "train.json")
  gen = "reused"
  if not os.path.exists(source):
    t0 = time.time()
    generate(source, args.n, args.species)
    gen = f"{time.time() - t0:.1f} s"
  out = os.path.join(folder, "built")
  shutil.rmtree(out, ignore_errors=True)
  cmd = [sys.executable, "-m", "linnaeus_jax.data.build", "--format=inat", f"--source={source}",
         f"--out={out}"]
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT)
  peak, stop = [0], threading.Event()
  sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, stop), daemon=True)
  sampler.start()
  rc = proc.wait()
  elapsed = time.time() - t0
  stop.set()
  maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  if rc != 0:
    sys.exit(f"build failed with exit code {rc}")
  with open(os.path.join(out, "build_report.json")) as f:
    written = json.load(f)["splits"]["train"]["rows_written"]
  gib = 1024 ** 3
  rows = [("images", f"{args.n:,}"), ("JSON size", f"{os.path.getsize(source) / gib:.2f} GiB"),
          ("generation", gen), ("build", f"{elapsed:.1f} s"),
          ("peak RSS (ru_maxrss)", f"{maxrss / gib:.2f} GiB"),
          ("peak RSS (sampled)", f"{peak[0] / gib:.2f} GiB"),
          ("rows/s", f"{written / elapsed:,.0f}"),
          ("labels.h5", f"{os.path.getsize(os.path.join(out, 'labels.h5')) / gib:.2f} GiB")]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
  main()
