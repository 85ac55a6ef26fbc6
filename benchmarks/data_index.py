"""Indexing cost of a labels-only file: class maps, validity, filters, split and taxonomy.

    python benchmarks/data_index.py --rows=1000000,3000000,10000000 [--dir=/tmp]

Builds a labels.h5 of N rows (4 ranks, 3 metadata components with raw columns, in_region, 5%
nulls) once per size, then times `linnaeus_jax.data.labels.load` in a fresh process and reports
its peak resident memory (ru_maxrss of that process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(path: str, n: int, seed: int = 0) -> None:
  if os.path.exists(path):
    return
  from linnaeus_jax.data import encoders  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  n_sp, n_g, n_f, n_o = 20000, 4000, 500, 40
  sp = rng.integers(0, n_sp, n)
  g, f, o = sp % n_g, (sp % n_g) % n_f, ((sp % n_g) % n_f) % n_o
  with h5py.File(path + ".tmp", "w") as h5:
    ids = np.char.add(np.arange(n).astype("S12"), b"_0.jpg").astype(object)
    h5.create_dataset("img_identifiers", data=ids, dtype=h5py.string_dtype())  # vlen, as ibrida
    h5.create_dataset("taxa_L10", data=np.where(rng.random(n) < 0.05, 0, 100000 + sp).astype(np.uint32))
    h5.create_dataset("taxa_L20", data=(50000 + g).astype(np.uint32))
    h5.create_dataset("taxa_L30", data=(20000 + f).astype(np.uint32))
    h5.create_dataset("taxa_L40", data=(10000 + o).astype(np.uint32))
    lat, lon = rng.uniform(-80, 80, n), rng.uniform(-180, 180, n)
    elev = rng.uniform(0, 3000, n)
    month = rng.integers(1, 13, n)
    h5.create_dataset("spatial", data=encoders.spatial(lat, lon)).attrs["column_names"] = [
        "spatial_x", "spatial_y", "spatial_z"]
    h5.create_dataset("temporal", data=encoders.temporal(month=month)).attrs["column_names"] = [
        "month_sin", "month_cos"]
    scales = (100, 500, 1000, 2000, 5000)
    h5.create_dataset("elevation_broadrange_2", data=encoders.elevation(elev, scales)).attrs[
        "column_names"] = encoders.elevation_column_names(scales)
    miss = rng.random(n) < 0.05
    h5.create_dataset("raw_lat", data=np.where(miss, np.nan, lat).astype(np.float32))
    h5.create_dataset("raw_lon", data=lon.astype(np.float32))
    h5.create_dataset("raw_elevation", data=elev.astype(np.float32))
    dates = np.char.add(b"2020-", np.char.zfill(month.astype("S2"), 2))
    h5.create_dataset("raw_date_observed", data=np.where(rng.random(n) < 0.05, b"", dates))
    h5.create_dataset("in_region", data=(rng.random(n) > 0.02).astype(np.uint8))
  os.replace(path + ".tmp", path)


CHILD = """
import os, resource, sys, time
sys.path.insert(0, {root!r})
from linnaeus_jax import config as config_lib
from linnaeus_jax.data import labels
c = config_lib.base_config()
c.data.h5.labels_path = {path!r}
c.data.hybrid.use_hybrid = True
c.data.hybrid.images_dir = os.path.dirname('{path}')  # exists; no image is read
c.data.partial.levels = True
c.data.meta.components.ELEVATION.enabled = True
t0 = time.time()
d = labels.load(c)
dt = time.time() - t0
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, len(d.train), len(d.val))
"""


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="1000000,3000000,10000000")
  p.add_argument("--dir", default="/tmp")
  a = p.parse_args()
  print("| rows | build_s | index_s | peak_rss_GiB | train | val | us/row |")
  print("|---|---|---|---|---|---|---|")
  for n in (int(x) for x in a.rows.split(",")):
    path = os.path.join(a.dir, f"linnaeus_jax_index_{n}.h5")
    t0 = time.time()
    build(path, n)
    build_s = time.time() - t0
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, path=path)],
                         capture_output=True, text=True, check=True).stdout.split()
    dt, rss, n_train, n_val = float(out[0]), float(out[1]), int(out[2]), int(out[3])
    print(f"| {n:,} | {build_s:.1f} | {dt:.1f} | {rss:.2f} | {n_train:,} | {n_val:,} | "
          f"{1e6 * dt / n:.2f} |", flush=True)


if __name__ == "__main__":
  main()
