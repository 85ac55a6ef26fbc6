"""python -m linnaeus_jax.predict --bundle=BUNDLE --images=FILES_OR_DIRS [--recursive=true]
[--metadata=meta.jsonl] [--top_k=5] --out=preds.jsonl

Folders are searched below too (sorted, depth first) unless `--recursive=false`; finding no
image at all is an error. meta.jsonl: one object per line, `image` (the path as given, the path
relative to its --images folder, or the file name) and any of `lat`, `lon`, `datetime_utc`,
`elevation_m`. preds.jsonl: one object per image, in input order: `image` (the path), `relpath`
(images found in a folder: the path below it, e.g. `sub/a.jpg`), `ranks` (coarse to fine,
`{"task", "top_k": [[taxon_id, probability], ...]}`), `warnings`, `error` (null, or why the
image could not be used). `--workdir=DIR` predicts from a training run instead of a bundle.
`python -m linnaeus_jax.inference.predict` is the same command.

Every image gets its record, whatever fails: an unreadable or missing image, or a whole chunk of
them, is its own `error` (ranks empty) and the run goes on, exits 0 and counts the errors. Bad
flags, a damaged bundle or workdir, an `--out` that cannot be written: one `error:` line, exit 1,
before anything is created. The folder of `--out` is created.
"""

from __future__ import annotations

import json
import os
import sys
import time

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(spec: list[str], recursive: bool = True
                ) -> tuple[list[str], list[str | None], list[str]]:
  """(paths, relative paths, folders without images) of `spec`: files as given (relative path
  None; a missing path is kept, it becomes that image's error) and the image files of each
  folder, below it too when `recursive`, in sorted order of their paths below the folder (a
  folder's files and subfolders by name, depth first), relative paths joined with '/'."""
  paths, rels, empty = [], [], []
  for item in spec:
    if not os.path.isdir(item):
      paths.append(item)
      rels.append(None)
      continue
    found = []
    for top, dirs, files in os.walk(item):
      dirs[:] = sorted(dirs) if recursive else []
      below = os.path.relpath(top, item)
      parts = () if below == os.curdir else tuple(below.split(os.sep))
      found += [parts + (f,) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    for parts in sorted(found):
      paths.append(os.path.join(item, *parts))
      rels.append("/".join(parts))
    if not found:
      empty.append(item)
  return paths, rels, empty


def no_images(folders: list[str], recursive: bool) -> str:
  """What to say of `folders` where `list_images` found no image (an error when that is all
  of --images, else a warning), naming them and the extensions looked for."""
  if not folders:
    return "--images names no files or folders"
  where = ", ".join(folders)
  below = " or below" if recursive else " (subfolders not searched: --recursive=false)"
  return (f"no image files in {where}{below}; looked for {' '.join(IMAGE_EXTENSIONS)} "
          "(any case)")


KINDS = ("path", "relative path", "file name")  # how a meta.jsonl line may name an image


def _meta_lines(path: str, problems: list[str]) -> tuple[dict, dict]:
  """({image key: the last meta.jsonl object naming it}, {image key: [its line numbers]});
  appends a problem per bad line (not UTF-8, not JSON, no "image" string)."""
  by_key, lines = {}, {}
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        problems.append(f"{path}:{n}: not UTF-8 text")
        continue
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
      lines.setdefault(rec["image"], []).append(n)
  return by_key, lines


def _image_keys(images: list[str], relpaths: list[str | None]) -> tuple[list, dict]:
  """(per image, the [(kind, key)] that may name it, most precise first (KINDS), each key
  once; {key: {kind: [index of the images it names that way]}})."""
  keys, owners = [], {}
  for i, (img, rel) in enumerate(zip(images, relpaths)):
    mine = []
    for kind, key in enumerate((img, rel, os.path.basename(img))):
      if key is not None and key not in (k for _, k in mine):
        mine.append((kind, key))
        owners.setdefault(key, {}).setdefault(kind, []).append(i)
    keys.append(mine)
  return keys, owners


def _matching_keys(mine: list, by_key: dict, owners: dict, path: str, problems: list[str],
                   ambiguous: set) -> list:
  """The [(kind, key)] of `mine` that meta.jsonl has and that name this image: not another
  one more precisely, and not ambiguously (a problem, the key added to `ambiguous`)."""
  found = []
  for kind, key in mine:
    if key not in by_key:
      continue
    best = min(owners[key])
    if best != kind:
      continue  # it names another image more precisely
    if kind > 0 and len(owners[key][kind]) > 1:
      ambiguous.add(key)
      problem = f"{path}: {key!r} names {len(owners[key][kind])} images; give their paths"
      problems += [problem] if problem not in problems else []
      continue
    found.append((kind, key))
  return found


def _duplicate_notes(found: list, lines: dict, path: str) -> list[str]:
  """Warnings for an image named by several lines; the first of `found` is the one used."""
  kind, key = found[0]
  note = []
  if len(lines[key]) > 1:
    note.append(f"metadata: {len(lines[key])} lines for {key!r} in {path} (lines "
                f"{', '.join(map(str, lines[key]))}); the last, line {lines[key][-1]}, is used")
  for other, k in found[1:]:
    note.append(f"metadata: line {lines[key][-1]} names this image by its {KINDS[kind]} and "
                f"line {lines[k][-1]} by its {KINDS[other]}; line {lines[key][-1]} (the "
                f"{KINDS[kind]}) is used")
  return note


def read_metadata(path: str, images: list[str], relpaths: list[str | None] | None = None
                  ) -> tuple[list[dict | None], list[str], list[list[str]]]:
  """Per image, its meta.jsonl object, matched by the path as given, else by the path relative
  to its --images folder (`relpaths`), else by file name; a relative path or file name that
  names several images matches none of them (a line naming an image more precisely, e.g. by
  its relative path, is not ambiguous because another image has that file name). Also problems
  for stderr (bad lines, entries that match no image, ambiguous names) and, per image,
  warnings for its record: several lines for it (the last line, or the most precise, wins)."""
  problems = []
  by_key, lines = _meta_lines(path, problems)
  keys, owners = _image_keys(images, relpaths or [None] * len(images))
  out, notes, used, ambiguous = [], [], set(), set()
  for i in range(len(images)):
    found = _matching_keys(keys[i], by_key, owners, path, problems, ambiguous)
    out.append(by_key[found[0][1]] if found else None)
    notes.append(_duplicate_notes(found, lines, path) if found else [])
    used.update(k for _, k in found)
  problems += [f"{path}: {k!r} matches no image" for k in by_key
               if k not in used and k not in ambiguous]
  return out, problems, notes


def _progress(done: int, total: int, t0: float) -> None:
  rate = done / max(time.time() - t0, 1e-9)
  bar = "#" * int(20 * done / max(total, 1))
  end = "\n" if done == total or not sys.stderr.isatty() else ""
  sys.stderr.write(f"\r{done}/{total} [{bar:<20}] {rate:.1f} img/s{end}")
  sys.stderr.flush()


def check_out(out: str) -> None:
  """ValueError unless `out` can become a file: not a folder, below a folder (or folders still to
  be created, `run` creates them) where we may write."""
  if os.path.isdir(out):
    raise ValueError(f"--out={out} is a folder; give a file, e.g. "
                     f"{os.path.join(out, 'preds.jsonl')}")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--out={out}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out={out}: no permission to write in {parent}")


def parse_buckets(spec: list[str]) -> tuple[int, ...]:
  """--buckets as sorted positive integers; ValueError otherwise."""
  try:
    buckets = tuple(sorted({int(b) for b in spec}))
  except ValueError:
    buckets = ()
  if not buckets or buckets[0] < 1:
    raise ValueError(f"--buckets must be positive integers, got {','.join(spec)!r}")
  return buckets


def predict_chunk(predictor, images: list, metadata: list, top_k: int) -> list[dict]:
  """`predictor.predict`, or, should the chunk fail as a whole, image by image: an input that
  breaks its batch costs only its own record (with `error` set)."""
  try:
    return predictor.predict(images, metadata, top_k=top_k)
  except Exception as e:  # pylint: disable=broad-except
    if len(images) > 1:
      return [r for i in range(len(images))
              for r in predict_chunk(predictor, images[i:i + 1], metadata[i:i + 1], top_k)]
    return [{"image": os.fspath(images[0]), "ranks": [], "warnings": [],
             "error": f"prediction failed: {type(e).__name__}: {e}"}]


def run(predictor, images: list[str], metadata: list[dict | None], out: str, top_k: int,
        chunk: int, notes: list[list[str]] | None = None,
        relpaths: list[str | None] | None = None) -> dict:
  """Writes preds.jsonl, one record per image in input order, whichever images fail; `notes`:
  per image, warnings to put first in its record; `relpaths`: per image found in a folder, its
  path below that folder, the record's `relpath` (None: no such key). Creates the folder of
  `out`; writes to a temporary name, renamed at the end (removed if the run stops). Returns
  counts."""
  t0, counts = time.time(), {"images": len(images), "errors": 0, "warnings": 0}
  notes = notes or [[] for _ in images]
  relpaths = relpaths or [None] * len(images)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".partial"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for a in range(0, len(images), chunk):
        results = predict_chunk(predictor, images[a:a + chunk], metadata[a:a + chunk], top_k)
        for res, note, rel in zip(results, notes[a:a + chunk], relpaths[a:a + chunk]):
          res["warnings"] = list(note) + res["warnings"]
          if rel is not None:
            res = {"image": res["image"], "relpath": rel, **res}
          counts["errors"] += res["error"] is not None
          counts["warnings"] += bool(res["warnings"])
          f.write(json.dumps(res) + "\n")
        _progress(min(a + chunk, len(images)), len(images), t0)
    os.replace(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return counts


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  f = flags.FLAGS
  # Everything about the request is checked before the model loads (and before jax imports).
  if bool(f.bundle) == bool(f.workdir):
    cli.fail("give exactly one of --bundle and --workdir")
  if f.top_k < 1:
    cli.fail(f"--top_k must be at least 1, got {f.top_k}")
  buckets = cli.call(parse_buckets, f.buckets)
  cli.call(check_out, f.out)
  images, relpaths, empty = cli.call(list_images, f.images, f.recursive)
  if not images:
    cli.fail(no_images(empty, f.recursive))
  metadata, problems, notes = [None] * len(images), [], None
  if f.metadata:
    if not os.path.exists(f.metadata):
      cli.fail(f"{f.metadata} not found")
    metadata, problems, notes = cli.call(read_metadata, f.metadata, images, relpaths)
  problems = [no_images([d], f.recursive) for d in empty] + problems
  for p in problems:
    print(f"warning: {p}", file=sys.stderr)
  # pylint: disable-next=g-import-not-at-top
  from linnaeus_jax.inference import predictor as predictor_lib
  kw = dict(consistency=f.consistency, buckets=buckets)
  pred = (cli.call(predictor_lib.Predictor.from_bundle, f.bundle, params=f.params, **kw)
          if f.bundle else cli.call(predictor_lib.Predictor.from_workdir, f.workdir, f.step, **kw))
  counts = cli.call(run, pred, images, metadata, f.out, f.top_k, buckets[-1], notes, relpaths)
  print(f"wrote {f.out}: {counts['images']} images, {counts['errors']} with errors, "
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
  flags.DEFINE_bool("recursive", True, "Search the subfolders of --images folders too.")
  flags.DEFINE_string("metadata", None, "meta.jsonl: {image, lat, lon, datetime_utc, "
                      "elevation_m} per line.")
  flags.DEFINE_integer("top_k", 5, "Classes per rank.")
  flags.DEFINE_string("out", None, "preds.jsonl to write.")
  flags.DEFINE_enum("consistency", "ancestor", ["ancestor", "original", "off"],
                    "Hierarchical consistency rule (docs/inference.md).")
  flags.DEFINE_list("buckets", ["1", "8", "32"], "Compiled batch sizes; requests are padded.")
  flags.mark_flags_as_required(["images", "out"])
  cli.run(main)
