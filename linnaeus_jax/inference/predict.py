"""python -m linnaeus_jax.predict --bundle=BUNDLE --images=FILES_OR_DIR [--metadata=meta.jsonl]
[--top_k=5] --out=preds.jsonl

meta.jsonl: one object per line, `image` (the file name or path as given) and any of `lat`, `lon`,
`datetime_utc`, `elevation_m`. preds.jsonl: one object per image, in input order: `image`,
`ranks` (coarse to fine, `{"task", "top_k": [[taxon_id, probability], ...]}`), `warnings`,
`error` (null, or why the image could not be used). `--workdir=DIR` predicts from a training run
instead of a bundle. `python -m linnaeus_jax.inference.predict` is the same command.
"""

from __future__ import annotations

import json
import os
import sys
import time

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(spec: list[str]) -> list[str]:
  """Files as given, and the image files of any folder (sorted); missing paths are kept (they
  become per-image errors)."""
  out = []
  for item in spec:
    if os.path.isdir(item):
      out += sorted(os.path.join(item, f) for f in os.listdir(item)
                    if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
      out.append(item)
  return out


def read_metadata(path: str, images: list[str]) -> tuple[list[dict | None], list[str]]:
  """Per image, its meta.jsonl object (matched by the path as given, else by file name), and
  problems (bad lines, entries that match no image, ambiguous names)."""
  by_key, problems = {}, []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"{path}:{n}: not JSON ({e})")
        continue
      if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        problems.append(f"{path}:{n}: needs an object with an \"image\" string")
        continue
      by_key[rec["image"]] = rec
  names = {}
  for img in images:
    names.setdefault(os.path.basename(img), []).append(img)
  out, used = [], set()
  for img in images:
    key = img if img in by_key else os.path.basename(img)
    rec = by_key.get(key)
    if rec is not None and key == os.path.basename(img) and len(names[key]) > 1:
      problems.append(f"{path}: {key!r} names {len(names[key])} images; give their paths")
      rec = None
    if rec is not None:
      used.add(key)
    out.append(rec)
  problems += [f"{path}: {k!r} matches no image" for k in by_key if k not in used]
  return out, problems


def _progress(done: int, total: int, t0: float) -> None:
  rate = done / max(time.time() - t0, 1e-9)
  bar = "#" * int(20 * done / max(total, 1))
  end = "\n" if done == total or not sys.stderr.isatty() else ""
  sys.stderr.write(f"\r{done}/{total} [{bar:<20}] {rate:.1f} img/s{end}")
  sys.stderr.flush()


def run(predictor, images: list[str], metadata: list[dict | None], out: str, top_k: int,
        chunk: int) -> dict:
  """Writes preds.jsonl (to a temporary name, renamed at the end); returns counts."""
  t0, counts = time.time(), {"images": len(images), "errors": 0, "warnings": 0}
  tmp = out + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    for a in range(0, len(images), chunk):
      for res in predictor.predict(images[a:a + chunk], metadata[a:a + chunk], top_k=top_k):
        counts["errors"] += res["error"] is not None
        counts["warnings"] += bool(res["warnings"])
        f.write(json.dumps(res) + "\n")
      _progress(min(a + chunk, len(images)), len(images), t0)
  os.replace(tmp, out)
  return counts


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.inference import bundle as bundle_lib, predictor as predictor_lib
  # pylint: enable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if bool(f.bundle) == bool(f.workdir):
    print("error: give exactly one of --bundle and --workdir", file=sys.stderr)
    sys.exit(1)
  images = list_images(f.images)
  if not images:
    print(f"error: no images in {f.images}", file=sys.stderr)
    sys.exit(1)
  metadata, problems = [None] * len(images), []
  if f.metadata:
    if not os.path.exists(f.metadata):
      print(f"error: {f.metadata} not found", file=sys.stderr)
      sys.exit(1)
    metadata, problems = read_metadata(f.metadata, images)
  for p in problems:
    print(f"warning: {p}", file=sys.stderr)
  buckets = tuple(sorted(int(b) for b in f.buckets))
  kw = dict(consistency=f.consistency, buckets=buckets)
  try:
    pred = (predictor_lib.Predictor.from_bundle(f.bundle, params=f.params, **kw) if f.bundle
            else predictor_lib.Predictor.from_workdir(f.workdir, f.step, **kw))
  except (bundle_lib.BundleError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  counts = run(pred, images, metadata, f.out, f.top_k, buckets[-1])
  print(f"wrote {f.out}: {counts['images']} images, {counts['errors']} could not be read, "
        f"{counts['warnings']} with warnings")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("bundle", None, "Bundle folder (python -m linnaeus_jax.export), or an "
                      "original bundle folder with --params.")
  flags.DEFINE_string("params", None, "For an original bundle: the convert_torch output folder.")
  flags.DEFINE_string("workdir", None, "A training workdir instead of a bundle.")
  flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default latest).")
  flags.DEFINE_list("images", None, "Image files and/or folders.")
  flags.DEFINE_string("metadata", None, "meta.jsonl: {image, lat, lon, datetime_utc, "
                      "elevation_m} per line.")
  flags.DEFINE_integer("top_k", 5, "Classes per rank.")
  flags.DEFINE_string("out", None, "preds.jsonl to write.")
  flags.DEFINE_enum("consistency", "ancestor", ["ancestor", "original", "off"],
                    "Hierarchical consistency rule (docs/inference.md).")
  flags.DEFINE_list("buckets", ["1", "8", "32"], "Compiled batch sizes; requests are padded.")
  flags.mark_flags_as_required(["images", "out"])
  cli.run(main)
