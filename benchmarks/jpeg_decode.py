"""JPEG decode + squash to S x S with and without PIL's reduced-scale (DCT) decoding.

    python benchmarks/jpeg_decode.py [--n=32] [--width=2048] [--height=1536] [--quality=90]
        [--sizes=224,384] [--rounds=3]

Writes N synthetic photo-like JPEGs (smooth gradients, a few hard edges, a textured patch,
sensor-like noise; different per image) to a temporary folder once and reads their bytes into
memory, then for each target size times `preprocessing.to_rgb_uint8(bytes, size, draft=...)`
(decode + RGB + BOX resize, one thread) over all images with draft=False and draft=True,
interleaved, and keeps the best of `--rounds` rounds. Prints ms per image, the speed-up and how
far the draft outputs are from the full decodes: mean and max absolute difference in uint8
levels and PSNR (dB, from the mean squared difference over all pixels of all images).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax import preprocessing  # noqa: E402


def photo(w: int, h: int, seed: int) -> np.ndarray:
  """A photo-like HxWx3 uint8 image: a smooth background (gradients, slow waves), an out-of-focus
  dark disc, a bright band and a tilted stripe (hard edges), a finely textured patch (fur,
  leaves) and Gaussian noise; phases and positions vary with `seed`."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  p = rng.uniform(0, 2 * np.pi, 3)
  a = np.stack([120 + 80 * np.sin(x / w * 3.1 + p[0]) * np.cos(y / h * 2.3),
                100 + 70 * x / w + 35 * np.sin((x + y) / 97 + p[1]),
                150 - 70 * y / h + 30 * np.cos(x / 53 + p[2])], -1)
  cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
  a[(x - cx) ** 2 + (y - cy) ** 2 < (0.2 * h) ** 2] *= 0.45
  band = int(rng.uniform(0.6, 0.85) * h)
  a[band:band + h // 10] += 50
  a[np.abs((x - 0.3 * w) * 0.8 - (y - 0.5 * h) * 0.6) < 6] = (240, 230, 200)
  x0, y0 = int(rng.uniform(0.05, 0.5) * w), int(rng.uniform(0.05, 0.5) * h)
  patch = a[y0:y0 + h // 3, x0:x0 + w // 3]
  patch += 40 * np.sin(x[y0:y0 + h // 3, x0:x0 + w // 3, None] * 0.9
                       + 3 * np.sin(y[y0:y0 + h // 3, x0:x0 + w // 3, None] * 0.21))
  a += rng.normal(0, 8, a.shape)
  return np.clip(a, 0, 255).astype(np.uint8)


def decode_all(data: list[bytes], size: int, draft: bool) -> tuple[float, list[np.ndarray]]:
  t = time.perf_counter()
  out = [preprocessing.to_rgb_uint8(d, size, draft=draft) for d in data]
  return time.perf_counter() - t, out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=32)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--height", type=int, default=1536)
  p.add_argument("--quality", type=int, default=90)
  p.add_argument("--sizes", default="224,384")
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  sizes = [int(s) for s in a.sizes.split(",")]

  t = time.perf_counter()
  data = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(a.n):
      path = os.path.join(tmp, f"{i:03d}.jpg")
      Image.fromarray(photo(a.width, a.height, i)).save(path, "JPEG", quality=a.quality)
      with open(path, "rb") as f:
        data.append(f.read())
  kb = sum(map(len, data)) / a.n / 1e3
  print(f"{a.n} synthetic {a.width}x{a.height} JPEGs (quality {a.quality}, {kb:.0f} KB each), "
        f"made in {time.perf_counter() - t:.1f} s", flush=True)
  for size in sizes:
    with Image.open(io.BytesIO(data[0])) as im:
      im.draft("RGB", (size, size))
      print(f"{size} px: draft decodes at {im.size[0]}x{im.size[1]}", flush=True)

  rows = []
  for size in sizes:
    best = {False: float("inf"), True: float("inf")}
    outs = {}
    for r in range(a.rounds):
      for draft in (False, True):
        s, outs[draft] = decode_all(data, size, draft)
        best[draft] = min(best[draft], s)
        print(f"size {size}, round {r}, draft={draft}: {s / a.n * 1e3:.2f} ms/image", flush=True)
    diff = np.stack(outs[True]).astype(np.float64) - np.stack(outs[False])
    mse = float(np.mean(diff ** 2))
    psnr = 10 * np.log10(255.0 ** 2 / mse) if mse else float("inf")
    rows.append((size, best[False] / a.n * 1e3, best[True] / a.n * 1e3,
                 float(np.abs(diff).mean()), int(np.abs(diff).max()), psnr))

  print("\n| size | full decode, ms/image | draft, ms/image | speed-up | mean abs diff | "
        "max abs diff | PSNR, dB |")
  print("|---|---|---|---|---|---|---|")
  for size, full, drafted, mad, mx, psnr in rows:
    print(f"| {size} | {full:.2f} | {drafted:.2f} | {full / drafted:.2f}x | {mad:.2f} | {mx} | "
          f"{psnr:.1f} |")


if __name__ == "__main__":
  main()
