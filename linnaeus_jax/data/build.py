"""Builds a dataset in our labels.h5 schema from iNaturalist competition JSON or a table.

    python -m linnaeus_jax.data.build --format=inat --source=train.json --val_source=val.json \
        --images_root=/data/inat2021 --out=/data/inat2021_built

Why: training reads labels.h5 (docs/data.md#the-files); this writes one from the sources people
have, with the metadata encoded by the encoders training and inference use (data/encoders.py),
missing values marked missing (raw columns: NaN / empty string) and never a valid-looking zero.

Output in --out (docs/data.md#building-a-dataset): `labels.h5` (`labels_val.h5` with
--val_source), `taxonomy_tree.json`, `taxa.json` (taxon id -> name and lineage),
`build_report.json`, and with --pack_images the image shards. A non-empty --out is refused
unless --overwrite. Everything is written into a temporary sibling folder of --out (same file
system) that replaces --out as a whole at the end: a failed build leaves --out as it was, and a
rebuild leaves no file of the earlier one.

--check_images decodes every image fully (PIL, in a process per core), as training will, so
missing, empty, truncated and undecodable files are bad rows before anything is written;
--pack_images always does.

Sources are read in bounded memory: the JSON value by value (json's C decoder over a sliding
buffer, `JsonStream`), tables in batches (pyarrow); columns are kept as numpy arrays, not a
Python object per row.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import datetime as dt
import errno
import functools
import hashlib
import json
import multiprocessing
import os
import posixpath
import re
import secrets
import shutil
import stat
import sys
import time
from concurrent import futures
from typing import Iterable, Iterator

import h5py
import numpy as np
from PIL import Image, ImageFile

from linnaeus_jax import taxonomy as taxonomy_lib
from linnaeus_jax.data import encoders

# iNat rank levels; lineages run from kingdom down (LINEAGE), tasks are `taxa_L<level>`.
RANKS = {"species": 10, "genus": 20, "family": 30, "order": 40, "class": 50, "phylum": 60,
         "kingdom": 70}
LINEAGE = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
DEFAULT_RANKS = (10, 20, 30, 40)  # the original's four tasks
DEFAULT_ELEVATION_SCALES = (100.0, 500.0, 1000.0, 2000.0, 5000.0)
ELEVATION_RANGE_M = (-11_000.0, 9_000.0)  # outside: a bad row (Mariana Trench to Everest)
# Why a row is bad (a row keeps the first reason found; report order is this order).
REASONS = ("bad_image_path", "duplicate_image", "missing_image_file", "unreadable_image",
           "no_annotation", "multiple_annotations", "unknown_category", "bad_taxon",
           "bad_coordinates", "bad_date", "bad_elevation", "annotation_unknown_image")
TABLE_KEYS = ("image", "latitude", "longitude", "date", "elevation") + LINEAGE + tuple(
    f"{r}_id" for r in LINEAGE)
ERROR_LISTED = 20  # bad rows named in the error message
_CHUNK = 1 << 16  # rows converted to numpy at a time
_DECODE_CHUNK = 256  # images per decoding task of --check_images
CHECK_MODES = ("decode", "exists")


class BuildError(ValueError):
  """A problem with the sources or options; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What to build; see `define_flags` for each field's meaning."""
  format: str
  source: str
  out: str
  val_source: str = ""
  images_root: str = ""
  locations: str = ""
  val_locations: str = ""
  categories: str = ""
  columns: tuple = ()  # ((key, column), ...) for --format=table
  ranks: tuple = ()  # levels; () = those of DEFAULT_RANKS the source has
  on_bad_row: str = "error"
  check_images: bool = False
  check_images_mode: str = "decode"  # decode: open and fully decode; exists: the file exists
  bbox: tuple = ()  # (min_lat, max_lat, min_lon, max_lon)
  elevation_scales: tuple = DEFAULT_ELEVATION_SCALES
  elevation_set: str = "broadrange_2"
  temporal_hours: str = "auto"  # auto: hour columns when any date has a time
  partial_levels: str = "auto"  # taxonomy_tree.json classes: auto = null class iff a rank is null
  pack_images: bool = False
  shard_size: int = 10_000
  max_side: int = 0
  overwrite: bool = False  # replace a non-empty --out (the whole folder)
  progress: bool = True

  def validate(self) -> None:
    problems = []
    if self.format not in ("inat", "table"):
      problems.append(f"--format must be 'inat' or 'table', got {self.format!r}")
    for name in ("source", "val_source", "locations", "val_locations", "categories"):
      path = getattr(self, name)
      if path and not os.path.isfile(path):
        problems.append(f"--{name}={path}: no such file")
    if self.val_locations and not self.val_source:
      problems.append("--val_locations needs --val_source")
    if self.format == "table" and (self.locations or self.val_locations or self.categories):
      problems.append("--locations, --val_locations and --categories are for --format=inat")
    if self.format == "inat" and self.columns:
      problems.append("--columns is for --format=table")
    if self.on_bad_row not in ("error", "drop"):
      problems.append(f"--on_bad_row must be 'error' or 'drop', got {self.on_bad_row!r}")
    if self.images_root and not os.path.isdir(self.images_root):
      problems.append(f"--images_root={self.images_root}: no such folder")
    if (self.check_images or self.pack_images) and not self.images_root:
      problems.append("--check_images and --pack_images need --images_root")
    if self.check_images_mode not in CHECK_MODES:
      problems.append(f"--check_images_mode must be 'decode' or 'exists', got "
                      f"{self.check_images_mode!r}")
    if os.path.exists(self.out) and not os.path.isdir(self.out):
      problems.append(f"--out={self.out} is a file, not a folder")
    out = os.path.realpath(self.out)
    for name in ("source", "val_source", "locations", "val_locations", "categories",
                 "images_root"):
      path = getattr(self, name)
      if path and os.path.commonpath([out, os.path.realpath(path)]) == out:
        problems.append(f"--out={self.out} holds --{name}={path}: the build replaces --out as "
                        "a whole")
    if self.bbox:
      a, b, c, d = self.bbox
      if not (-90 <= a <= b <= 90 and -180 <= c <= 180 and -180 <= d <= 180):
        problems.append(f"--bbox {list(self.bbox)}: expected min_lat <= max_lat in [-90, 90] "
                        "and longitudes in [-180, 180] (min_lon > max_lon crosses 180)")
    if not self.elevation_scales or min(self.elevation_scales) <= 0:
      problems.append("--elevation_scales must be positive numbers")
    if not re.fullmatch(r"\w+", self.elevation_set):
      problems.append(f"--elevation_set must be a word (letters, digits, _), got "
                      f"{self.elevation_set!r}")
    for name in ("temporal_hours", "partial_levels"):
      if getattr(self, name) not in ("auto", "true", "false"):
        problems.append(f"--{name} must be auto, true or false, got {getattr(self, name)!r}")
    if self.shard_size < 1 or self.max_side < 0:
      problems.append("--shard_size must be >= 1 and --max_side >= 0")
    if problems:
      raise BuildError("invalid build options:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- values


def taxon_id(level: int, lineage: Iterable[str]) -> int:
  """Stable uint32 id (never 0) of a taxon named by its lineage, kingdom first, down to it.

  id = 1 + int(sha256(f"L{level}:" + "/".join(lineage))[:8 bytes], big-endian) % (2**32 - 1);
  unknown coarser ranks are empty strings, so the same genus under two families is two taxa.
  """
  key = f"L{level}:" + "/".join(lineage)
  return 1 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 0xFFFFFFFF


def to_number(value) -> float:
  """A float from a JSON/table value: NaN for missing (None, '', 'nan'); ValueError on garbage."""
  if value is None:
    return np.nan
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, str):
    s = value.strip()
    return np.nan if not s else float(s)  # float() accepts 'nan', 'inf': checked by the caller
  raise ValueError(f"not a number: {value!r}")


def numbers(values: list) -> tuple[np.ndarray, dict[int, str]]:
  """(float64 array, {index: problem}) of `values`; missing -> NaN, garbage -> NaN + problem."""
  try:
    return np.array(values, np.float64), {}
  except (TypeError, ValueError):
    out, bad = np.empty(len(values)), {}
    for i, v in enumerate(values):
      try:
        out[i] = to_number(v)
      except (TypeError, ValueError):
        out[i], bad[i] = np.nan, f"not a number: {v!r}"
    return out, bad


_DATE_ONLY = re.compile(r"\d{4}-?\d{2}-?\d{2}")
# The common forms (iNat: '2010-07-14 20:19:00+00:00'), read without datetime: a UTC or naive
# time, or a date alone. Anything else goes through datetime.fromisoformat.
_ISO_UTC = re.compile(r"(\d{4}-(\d\d)-\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:\.\d+)?)?"
                      r"(?:Z|[+-]00:?00)?)?")


@functools.lru_cache(maxsize=1 << 16)
def _is_day(text: str) -> bool:
  try:
    dt.date.fromisoformat(text)
    return True
  except ValueError:
    return False


def parse_when(value) -> tuple[int, int, str]:
  """(month 1-12, hour 0-23 or -1 without a time, raw string) of an observed date/time.

  ISO 8601 strings with or without a time and zone, datetimes and dates. As inference does
  (preprocessing.py), a time with a zone is converted to UTC first. Missing (None, '') gives
  (0, -1, ''); ValueError when it cannot be read.
  """
  if value is None:
    return 0, -1, ""
  if isinstance(value, dt.datetime):
    when, has_time, raw = value, True, value.isoformat()
  elif isinstance(value, dt.date):
    when, has_time, raw = value, False, value.isoformat()
  elif isinstance(value, str):
    raw = value.strip()
    if not raw:
      return 0, -1, ""
    m = _ISO_UTC.fullmatch(raw)
    if m and _is_day(m[1]) and (m[3] is None or (int(m[3]) < 24 and int(m[4]) < 60
                                                  and int(m[5] or 0) < 60)):
      return int(m[2]), int(m[3]) if m[3] is not None else -1, raw
    try:
      when = dt.datetime.fromisoformat(raw)
    except ValueError:
      raise ValueError(f"not an ISO date: {value!r}") from None
    has_time = not _DATE_ONLY.fullmatch(raw)
  else:
    raise ValueError(f"not a date: {value!r}")
  if has_time and when.tzinfo is not None:
    when = when.astimezone(dt.timezone.utc)
  return when.month, when.hour if has_time else -1, raw


def dates(values: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
  """(month int8, hour int8, raw bytes, {index: problem}) of `values` (see parse_when)."""
  month, hour = np.zeros(len(values), np.int8), np.full(len(values), -1, np.int8)
  raw, bad = [b""] * len(values), {}
  for i, v in enumerate(values):
    try:
      m, h, r = parse_when(v)
    except ValueError as e:
      bad[i] = str(e)
      continue
    month[i], hour[i], raw[i] = m, h, r.encode()
  return month, hour, np.array(raw, dtype="S"), bad


_POSIX = os.sep == "/"


def image_identifiers(paths: list, images_root: str) -> tuple[np.ndarray, dict[int, str]]:
  """(identifiers as utf-8 bytes, {index: problem}): paths relative to `images_root`.

  Relative paths are kept (normalised); absolute ones must lie under `images_root`. Empty
  paths and paths that climb out of the root are problems: the loader would refuse them.
  """
  root = os.path.abspath(images_root) if images_root else ""
  out, bad = [b""] * len(paths), {}
  for i, p in enumerate(paths):
    if (_POSIX and isinstance(p, str) and p and p[0] not in "/. " and p[-1] not in "/. "
        and "/." not in p and "//" not in p):
      out[i] = p.encode()  # already a normal relative path
      continue
    s = "" if p is None else str(p).strip()
    if not s:
      bad[i] = "empty image path"
      continue
    if os.path.isabs(s):
      if not root:
        bad[i] = f"absolute path {s!r} without --images_root"
        continue
      s = os.path.relpath(os.path.normpath(s), root)
    s = posixpath.normpath(s.replace(os.sep, "/"))
    if s == ".." or s.startswith("../") or s == ".":
      bad[i] = f"{p!r} is outside --images_root"
      continue
    out[i] = s.encode()
  return np.array(out, dtype="S"), bad


# ----------------------------------------------------------------------------- split columns


@dataclasses.dataclass
class Split:
  """The columns of one source (row i = its i-th image), before bad rows are removed."""
  name: str  # 'train' or 'val'
  ident: np.ndarray  # (N,) bytes, relative image path
  taxa: dict[int, np.ndarray]  # level -> (N,) uint32, 0 = unknown
  lat: np.ndarray  # (N,) float64, NaN = missing
  lon: np.ndarray
  month: np.ndarray  # (N,) int8, 0 = missing
  hour: np.ndarray  # (N,) int8, -1 = no time
  date: np.ndarray  # (N,) bytes, the date as given, b'' = missing
  elev: np.ndarray | None  # (N,) float64 metres, NaN = missing; None: no elevation column
  reason: np.ndarray  # (N,) int8, 0 = good, k = REASONS[k - 1]
  detail: dict[int, str]  # row -> what is wrong
  extra_bad: list[dict]  # problems that are not rows (annotations naming no image), listed
  ranks: tuple[int, ...]  # levels the source has
  extra_bad_count: int = 0  # all of them (the list holds the first 1000)

  def __len__(self) -> int:
    return len(self.ident)

  def mark(self, rows, reason: str, details=None) -> None:
    """Gives `rows` the bad reason `reason` unless they already have one."""
    rows = np.asarray(rows, np.int64)
    if not len(rows):
      return
    code = REASONS.index(reason) + 1
    fresh = rows[self.reason[rows] == 0]
    self.reason[fresh] = code
    for r in fresh:
      if details is not None:
        self.detail[int(r)] = details(int(r)) if callable(details) else details


def _mark_dict(split: Split, offset: int, problems: dict[int, str], reason: str) -> None:
  for i in sorted(problems):
    split.mark([offset + i], reason, problems[i])


class Taxa:
  """Taxon ids of every rank seen, their lineage names, and id collisions (errors)."""

  def __init__(self):
    self.names: dict[int, dict[int, dict]] = {level: {} for level in RANKS.values()}
    self.cache: dict[tuple, tuple] = {}

  def ids(self, lineage: tuple, extra: dict | None = None) -> tuple[int, ...]:
    """Ids of the 7 ranks of `lineage` (kingdom..species slots: name, ('#', id) or None)."""
    if lineage in self.cache:
      return self.cache[lineage]
    out, path = [], []
    for rank, slot in zip(LINEAGE, lineage):
      level = RANKS[rank]
      if isinstance(slot, tuple):  # given by id
        path.append(f"#{slot[1]}")
        out.append(slot[1])
        self.names[level].setdefault(slot[1], {"id_given": True})
        continue
      name = slot or ""
      path.append(name)
      if not name:
        out.append(0)
        continue
      tid = taxon_id(level, path)
      lineage_str = "/".join(path)
      seen = self.names[level].get(tid)
      if seen is not None and seen.get("lineage") != lineage_str:
        raise BuildError(f"taxon id collision at rank {rank}: {seen.get('lineage')!r} and "
                         f"{lineage_str!r} both hash to {tid}; rename one or give this rank by id "
                         f"({rank}_id)")
      if seen is None:
        entry = {"name": name, "lineage": lineage_str}
        if rank == "species" and extra:
          entry.update(extra)
        self.names[level][tid] = entry
      out.append(tid)
    self.cache[lineage] = tuple(out)
    return self.cache[lineage]


# ----------------------------------------------------------------------------- progress


class Progress:
  """A progress line on stderr, redrawn in place on a terminal, every 30 s in a log."""

  def __init__(self, enabled: bool):
    self.enabled, self.tty = enabled, sys.stderr.isatty()
    self.start = self.last = time.time()

  def show(self, text: str, force: bool = False) -> None:
    now = time.time()
    if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 30)):
      return
    self.last = now
    line = f"build: {text} ({now - self.start:.0f} s)"
    print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n",
          file=sys.stderr, flush=True)

  def done(self) -> None:
    if self.enabled and self.tty:
      print(file=sys.stderr)


# ----------------------------------------------------------------------------- JSON streaming


_WS = re.compile(r"[ \t\n\r]*")
_MAX_VALUE = 64 << 20  # a value not parsed within this many characters is an error


class JsonStream:
  """Reads a JSON file value by value (json's C decoder on a sliding text buffer).

  Why not json.load: the iNat 2021 train file is ~1 GB (2.7M images); as Python objects it
  would take ~10 GB. Memory here is the buffer (4 MB) plus one value. Python's NaN and Infinity
  literals (iNat 2021 writes missing coordinates as NaN) are read as json.load reads them. The
  bytes are hashed (sha256) as they are read.
  """

  def __init__(self, path: str, on_read=None):
    self.path = path
    self.f = open(path, "rb")  # pylint: disable=consider-using-with
    self.size = os.fstat(self.f.fileno()).st_size
    self.sha = hashlib.sha256()
    self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    self.buf, self.pos, self.eof = "", 0, False
    self.decoder = json.JSONDecoder()
    self.on_read = on_read

  def _more(self) -> None:
    data = self.f.read(1 << 22)
    self.sha.update(data)
    self.eof = not data
    try:
      text = self.utf8.decode(data, final=self.eof)
    except UnicodeDecodeError as e:
      raise BuildError(f"{self.path}: not UTF-8 text near byte {self.f.tell() - len(data)}: "
                       f"{e.reason}") from None
    self.buf = self.buf[self.pos:] + text
    self.pos = 0
    if self.on_read:
      self.on_read(self.f.tell() / max(self.size, 1))

  def peek(self) -> str:
    """The next non-space character ('' at the end), without consuming it."""
    if self.pos < len(self.buf) and self.buf[self.pos] not in " \t\n\r":
      return self.buf[self.pos]
    while True:
      self.pos = _WS.match(self.buf, self.pos).end()
      if self.pos < len(self.buf) or self.eof:
        return self.buf[self.pos:self.pos + 1]
      self._more()

  def take(self, allowed: str) -> str:
    c = self.peek()
    if not c or c not in allowed:
      self.fail(f"expected one of {allowed!r}")
    self.pos += 1
    return c

  def value(self):
    """The next JSON value (a value ending exactly at the buffer's end is re-read whole)."""
    self.peek()
    while True:
      try:
        obj, end = self.decoder.raw_decode(self.buf, self.pos)
        if end < len(self.buf) or self.eof:
          self.pos = end
          return obj
      except json.JSONDecodeError as e:
        if self.eof or len(self.buf) - self.pos > _MAX_VALUE:
          self.fail(e.msg)
      self._more()

  def fail(self, what: str):
    consumed = self.f.tell() - len(self.buf[self.pos:].encode())
    raise BuildError(f"{self.path}: not valid JSON near byte {max(consumed, 0)}: {what} "
                     f"(at {self.buf[self.pos:self.pos + 40]!r})")

  def close(self) -> None:
    self.f.close()


def json_items(path: str, on_read=None, hashes: dict | None = None) -> Iterator[tuple]:
  """(key, value) of a JSON file, streamed: for a top-level object, each element of an array
  member as (member key, element) and other members as (key, value); for a top-level array,
  ('', element). One pass; the file's (size, sha256) goes into `hashes` at the end."""
  stream = JsonStream(path, on_read)
  try:
    if stream.peek() == "[":
      yield from _array(stream, "")
    else:
      stream.take("{")
      if stream.peek() == "}":
        stream.pos += 1
      else:
        while True:
          if stream.peek() != '"':
            stream.fail("expected a member name")
          key = stream.value()
          stream.take(":")
          if stream.peek() == "[":
            yield from _array(stream, key)
          else:
            yield key, stream.value()
          if stream.take(",}") == "}":
            break
    if stream.peek():
      stream.fail("text after the end of the JSON value")
    while not stream.eof:  # hash to the end
      stream._more()  # pylint: disable=protected-access
  finally:
    stream.close()
  if hashes is not None:
    hashes.setdefault(path, (stream.size, stream.sha.hexdigest()))


def _array(stream: JsonStream, key: str) -> Iterator[tuple]:
  stream.take("[")
  if stream.peek() == "]":
    stream.pos += 1
    return
  while True:
    yield key, stream.value()
    if stream.take(",]") == "]":
      return


# ----------------------------------------------------------------------------- iNat


def _category_table(cats: list[dict], taxa: Taxa, path: str):
  """(sorted category ids, {level: uint32 ids aligned with them}, levels the categories have)."""
  if not cats:
    raise BuildError(f"{path}: no categories")
  try:
    ids = np.array([c["id"] for c in cats], np.int64)
  except (KeyError, TypeError, ValueError):
    raise BuildError(f"{path}: a category without an integer id") from None
  uniq, counts = np.unique(ids, return_counts=True)
  if np.any(counts > 1):
    raise BuildError(f"{path}: category ids {uniq[counts > 1][:10].tolist()} appear twice")
  have = {"species"} | {r for r in LINEAGE[:-1] if any(r in c for c in cats)}
  order = np.argsort(ids)
  table = {RANKS[r]: np.zeros(len(cats), np.uint32) for r in LINEAGE}
  for k, i in enumerate(order):
    c = cats[i]
    lineage = tuple(str(c.get("name" if r == "species" else r) or "").strip() or None
                    for r in LINEAGE)
    for r, tid in zip(LINEAGE, taxa.ids(lineage, {"category_id": int(c["id"])})):
      table[RANKS[r]][k] = tid
  return ids[order], table, tuple(sorted(RANKS[r] for r in have))


class _Columns:
  """Image columns collected in chunks of numpy arrays, with the problems found per row."""

  def __init__(self, path: str, images_root: str):
    self.path, self.root = path, images_root
    self.parts: dict[str, list] = {k: [] for k in ("id", "ident", "lat", "lon", "month", "hour",
                                                   "date")}
    self.buf: dict[str, list] = {k: [] for k in ("id", "file", "lat", "lon", "date")}
    self.problems: dict[str, dict[int, str]] = {"bad_image_path": {}, "bad_coordinates": {},
                                                "bad_date": {}}
    self.n = 0

  def add(self, image_id, file_name, lat, lon, date) -> None:
    b = self.buf
    b["id"].append(image_id)
    b["file"].append(file_name)
    b["lat"].append(lat)
    b["lon"].append(lon)
    b["date"].append(date)
    if len(b["id"]) >= _CHUNK:
      self.flush()

  def flush(self) -> None:
    b, offset = self.buf, self.n
    if not b["id"]:
      return
    try:
      self.parts["id"].append(np.array(b["id"], np.int64))
    except (TypeError, ValueError, OverflowError):
      raise BuildError(f"{self.path}: an image without an integer id near image {offset}") \
          from None
    ident, bad = image_identifiers(b["file"], self.root)
    self.parts["ident"].append(ident)
    self.problems["bad_image_path"].update({offset + i: v for i, v in bad.items()})
    for key in ("lat", "lon"):
      col, bad = numbers(b[key])
      self.parts[key].append(col)
      self.problems["bad_coordinates"].update({offset + i: f"{key}: {v}"
                                               for i, v in bad.items()})
    month, hour, raw, bad = dates(b["date"])
    self.parts["month"].append(month)
    self.parts["hour"].append(hour)
    self.parts["date"].append(raw)
    self.problems["bad_date"].update({offset + i: v for i, v in bad.items()})
    self.n += len(b["id"])
    for v in b.values():
      v.clear()

  def arrays(self) -> dict[str, np.ndarray]:
    self.flush()
    return {k: np.concatenate(v) for k, v in self.parts.items() if v}


def _read_inat_json(path: str, images_root: str, progress: Progress, hashes: dict):
  """One pass over a competition JSON: (image columns, problems, annotations, categories)."""
  cols = _Columns(path, images_root)
  a_img, a_cat, cats = [], [], []
  base = os.path.basename(path)

  def show(frac):
    progress.show(f"{base}: {cols.n + len(cols.buf['id']):,} images, {len(a_img):,} "
                  f"annotations ({100 * frac:.0f}% read)")
  for key, item in json_items(path, show, hashes):
    if key == "images":
      if not isinstance(item, dict):
        raise BuildError(f"{path}: an element of 'images' is not an object: {item!r:.80}")
      cols.add(item.get("id"), item.get("file_name"), item.get("latitude"),
               item.get("longitude"), item.get("date"))
    elif key == "annotations":
      if not isinstance(item, dict):
        raise BuildError(f"{path}: an element of 'annotations' is not an object: {item!r:.80}")
      a_img.append(item.get("image_id"))
      a_cat.append(item.get("category_id"))
    elif key == "categories":
      cats.append(item)
  arrays = cols.arrays()
  if not arrays:
    raise BuildError(f"{path}: no images (expected a list 'images' as in the iNat layouts)")
  if not a_img:
    raise BuildError(f"{path}: no annotations (a test split has none: it cannot be trained on)")
  try:
    a_img, a_cat = np.array(a_img, np.int64), np.array(a_cat, np.int64)
  except (TypeError, ValueError, OverflowError):
    raise BuildError(f"{path}: an annotation without an integer image_id or category_id") \
        from None
  return arrays, cols.problems, a_img, a_cat, cats


def _read_list(path: str, key: str, progress: Progress, hashes: dict) -> list:
  """The elements of a JSON list file, or of its member `key` (a smaller side file)."""
  base = os.path.basename(path)
  out = [v for k, v in json_items(path, lambda f: progress.show(f"{base}: {100 * f:.0f}% read"),
                                  hashes) if k in ("", key)]
  if any(not isinstance(v, dict) for v in out):
    raise BuildError(f"{path}: expected a list of objects (or an object with a list {key!r})")
  return out


def read_inat(name: str, path: str, locations: str, categories: str, images_root: str,
              taxa: Taxa, progress: Progress, hashes: dict) -> Split:
  """One split from iNat competition JSON (2017/2018/2021 layouts, docs/data.md)."""
  cols, problems, a_img, a_cat, cats = _read_inat_json(path, images_root, progress, hashes)
  if categories:  # 2018's categories.json: the full, un-obfuscated taxonomy
    cats = _read_list(categories, "categories", progress, hashes)
  cat_ids, cat_taxa, ranks = _category_table(cats, taxa, categories or path)
  del cats
  n = len(cols["id"])
  split = Split(name=name, ident=cols["ident"], taxa={}, lat=cols["lat"], lon=cols["lon"],
                month=cols["month"], hour=cols["hour"], date=cols["date"], elev=None,
                reason=np.zeros(n, np.int8), detail={}, extra_bad=[], ranks=ranks)
  for reason, found in problems.items():
    _mark_dict(split, 0, found, reason)

  image_ids = cols["id"]
  order = np.argsort(image_ids, kind="stable")
  sorted_ids = image_ids[order]
  dup = np.flatnonzero(np.r_[False, sorted_ids[1:] == sorted_ids[:-1]])
  split.mark(order[dup], "duplicate_image", lambda r: f"image id {image_ids[r]} seen before")
  pos = np.minimum(np.searchsorted(sorted_ids, a_img), n - 1)
  found = sorted_ids[pos] == a_img
  orphans = np.flatnonzero(~found)
  split.extra_bad_count = len(orphans)
  split.extra_bad = [{"split": name, "row": None, "annotation": int(k),
                      "reason": "annotation_unknown_image",
                      "detail": f"image_id {a_img[k]} is not among the images"}
                     for k in orphans[:1000]]
  rows = order[pos[found]]
  per_row = np.bincount(rows, minlength=n)
  split.mark(np.flatnonzero(per_row == 0), "no_annotation", "no annotation names this image")
  split.mark(np.flatnonzero(per_row > 1), "multiple_annotations",
             lambda r: f"{per_row[r]} annotations name image id {image_ids[r]}")
  cat_of_row = np.full(n, -1, np.int64)
  cat_of_row[rows] = a_cat[found]
  cpos = np.minimum(np.searchsorted(cat_ids, cat_of_row), len(cat_ids) - 1)
  known = cat_ids[cpos] == cat_of_row
  split.mark(np.flatnonzero(~known & (per_row == 1)), "unknown_category",
             lambda r: f"category_id {cat_of_row[r]} is not among the categories")
  split.taxa = {level: np.where(known, col[cpos], 0).astype(np.uint32)
                for level, col in cat_taxa.items()}
  if locations:
    _apply_locations(split, locations, sorted_ids, order, progress, hashes)
  return split


def _apply_locations(split: Split, path: str, sorted_ids, order, progress, hashes) -> None:
  """2017/2018: coordinates and dates from a locations file ({id, lat, lon, date, ...} per
  image id), replacing those of the images; images it does not name keep theirs."""
  base, ids, lat, lon, when = os.path.basename(path), [], [], [], []
  for key, loc in json_items(path, lambda f: progress.show(f"{base}: {100 * f:.0f}% read"),
                             hashes):
    if key not in ("", "locations"):
      continue
    if not isinstance(loc, dict):
      raise BuildError(f"{path}: expected a list of objects {{id, lat, lon, date}}")
    ids.append(loc.get("id"))
    lat.append(loc.get("lat", loc.get("latitude")))
    lon.append(loc.get("lon", loc.get("longitude")))
    when.append(loc.get("date"))
  if not ids:
    raise BuildError(f"{path}: no locations (expected a list of {{id, lat, lon, date}})")
  try:
    l_ids = np.array(ids, np.int64)
  except (TypeError, ValueError, OverflowError):
    raise BuildError(f"{path}: a location without an integer id") from None
  n = len(sorted_ids)
  lpos = np.minimum(np.searchsorted(sorted_ids, l_ids), n - 1)
  hit = np.flatnonzero(sorted_ids[lpos] == l_ids)
  target = order[lpos[hit]]
  lat, bad_lat = numbers([lat[i] for i in hit])
  lon, bad_lon = numbers([lon[i] for i in hit])
  month, hour, raw, bad_date = dates([when[i] for i in hit])
  split.lat[target], split.lon[target] = lat, lon
  split.month[target], split.hour[target] = month, hour
  split.date = split.date.astype(f"S{max(split.date.itemsize, raw.itemsize, 1)}")
  split.date[target] = raw
  for i, v in sorted({**bad_lat, **bad_lon}.items()):
    split.mark([target[i]], "bad_coordinates", f"{os.path.basename(path)}: {v}")
  for i, v in sorted(bad_date.items()):
    split.mark([target[i]], "bad_date", f"{os.path.basename(path)}: {v}")


# ----------------------------------------------------------------------------- tables


def parse_columns(spec: str) -> tuple:
  """`--columns`: 'key=column,...' or a JSON/YAML file of {key: column}; as sorted pairs."""
  if not spec:
    return ()
  if spec.endswith((".json", ".yaml", ".yml")):
    if not os.path.isfile(spec):
      raise BuildError(f"--columns={spec}: no such file")
    with open(spec, encoding="utf-8") as f:
      if spec.endswith(".json"):
        mapping = json.load(f)
      else:
        import yaml  # pylint: disable=g-import-not-at-top
        mapping = yaml.safe_load(f)
    if not isinstance(mapping, dict):
      raise BuildError(f"--columns={spec}: expected a mapping of key -> column name")
  else:
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      if "=" not in part:
        raise BuildError(f"--columns: {part!r} is not key=column")
      k, v = part.split("=", 1)
      mapping[k.strip()] = v.strip()
  unknown = sorted(set(mapping) - set(TABLE_KEYS))
  if unknown:
    raise BuildError(f"--columns: unknown keys {unknown}; known: {', '.join(TABLE_KEYS)}")
  for r in LINEAGE:
    if r in mapping and f"{r}_id" in mapping:
      raise BuildError(f"--columns: give {r} by name or by id ({r}_id), not both")
  return tuple(sorted((str(k), str(v)) for k, v in mapping.items()))


def _table_batches(path: str, wanted: list[str]) -> Iterator[dict[str, list]]:
  """Batches of the `wanted` columns of a CSV or Parquet file, as Python lists per column."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if path.endswith((".parquet", ".pq")):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    _check_columns(path, wanted, names)
    for batch in pf.iter_batches(batch_size=_CHUNK, columns=wanted):
      yield {c: batch.column(c).to_pylist() for c in wanted}
    return
  import csv  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
  with open(path, newline="", encoding="utf-8-sig") as f:
    names = next(csv.reader(f), [])
  _check_columns(path, wanted, names)
  reader = pcsv.open_csv(
      path, read_options=pcsv.ReadOptions(block_size=1 << 22),
      parse_options=pcsv.ParseOptions(newlines_in_values=True),
      convert_options=pcsv.ConvertOptions(
          include_columns=wanted, column_types={c: pa.string() for c in wanted},
          strings_can_be_null=False, quoted_strings_can_be_null=False))
  for batch in reader:
    yield {c: batch.column(c).to_pylist() for c in wanted}


def _check_columns(path: str, wanted: list[str], names: list[str]) -> None:
  missing = [c for c in wanted if c not in names]
  if missing:
    raise BuildError(f"{path}: no column(s) {missing}; the table has {names}")


def _taxon_value(value) -> int:
  """A taxon id from a table cell: 0 for empty; ValueError unless an integer in 1..2**32-1."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return 0
  if isinstance(value, float):
    if np.isnan(value):
      return 0
    if not value.is_integer():
      raise ValueError(f"taxon id {value!r} is not an integer")
  try:
    tid = int(value) if not isinstance(value, str) else int(value.strip())
  except (TypeError, ValueError):
    raise ValueError(f"taxon id {value!r} is not an integer") from None
  if not 0 <= tid <= 0xFFFFFFFF:
    raise ValueError(f"taxon id {tid} is outside 0..2**32-1")
  return tid


def _table_values(batch: dict, mapping: dict, m: int, images_root: str, offset: int,
                  parts: dict, problems: dict) -> None:
  """Appends the `m` rows of a batch's image identifiers, coordinates, dates and elevations to
  `parts`, and their problems (rows numbered from `offset`) to `problems`."""
  none = [None]
  ident, bad = image_identifiers(batch[mapping["image"]], images_root)
  parts["ident"].append(ident)
  problems["bad_image_path"].update({offset + i: v for i, v in bad.items()})
  for key in ("latitude", "longitude"):
    col, bad = numbers(batch[mapping[key]] if key in mapping else none * m)
    parts[key[:3]].append(col)
    problems["bad_coordinates"].update({offset + i: f"{key}: {v}" for i, v in bad.items()})
  month, hour, raw, bad = dates(batch[mapping["date"]] if "date" in mapping else none * m)
  parts["month"].append(month)
  parts["hour"].append(hour)
  parts["date"].append(raw)
  problems["bad_date"].update({offset + i: v for i, v in bad.items()})
  if "elevation" in mapping:
    col, bad = numbers(batch[mapping["elevation"]])
    parts["elev"].append(col)
    problems["bad_elevation"].update({offset + i: v for i, v in bad.items()})


def _table_taxa(batch: dict, rank_keys: list, m: int, taxa: Taxa, offset: int,
                bad_taxon: dict) -> np.ndarray:
  """(m, len(LINEAGE)) uint32 taxon ids of a batch's rows, each rank by name or by id
  (`rank_keys`); rows with a malformed id stay 0 and get their problem in `bad_taxon`."""
  ids = np.zeros((m, len(LINEAGE)), np.uint32)
  cells = [batch[by_name] if by_name else batch[by_id] if by_id else [None] * m
           for _, by_name, by_id in rank_keys]
  for i in range(m):
    try:
      lineage = tuple(
          (("#", _taxon_value(cells[k][i])) if rank_keys[k][2] else
           (None if cells[k][i] is None else str(cells[k][i]).strip() or None))
          for k in range(len(LINEAGE)))
    except ValueError as e:
      bad_taxon[offset + i] = str(e)
      continue
    lineage = tuple(None if isinstance(s, tuple) and s[1] == 0 else s for s in lineage)
    ids[i] = taxa.ids(lineage)
  return ids


def read_table(name: str, path: str, columns: tuple, images_root: str, taxa: Taxa,
               progress: Progress, hashes: dict) -> Split:
  """One split from a CSV or Parquet table through the key -> column mapping `columns`."""
  mapping = dict(columns)
  if "image" not in mapping:
    raise BuildError("--columns: the 'image' key (image path column) is required")
  rank_keys = [(r, mapping.get(r), mapping.get(f"{r}_id")) for r in LINEAGE]
  ranks = tuple(sorted(RANKS[r] for r, by_name, by_id in rank_keys if by_name or by_id))
  if not ranks:
    raise BuildError("--columns: map at least one rank (species, genus, ... or species_id, ...)")
  wanted = list(dict.fromkeys(mapping.values()))
  parts: dict[str, list] = {k: [] for k in ("ident", "lat", "lon", "month", "hour", "date",
                                            "elev", "taxa")}
  problems: dict[str, dict[int, str]] = {r: {} for r in REASONS}
  offset = 0
  for batch in _table_batches(path, wanted):
    m = len(batch[wanted[0]])
    _table_values(batch, mapping, m, images_root, offset, parts, problems)
    parts["taxa"].append(_table_taxa(batch, rank_keys, m, taxa, offset, problems["bad_taxon"]))
    offset += m
    progress.show(f"{os.path.basename(path)}: {offset:,} rows")
  if offset == 0:
    raise BuildError(f"{path}: no rows")
  hashes.setdefault(path, _sha256(path))
  cat = {k: np.concatenate(v) for k, v in parts.items() if v}
  split = Split(name=name, ident=cat["ident"],
                taxa={RANKS[r]: cat["taxa"][:, j] for j, r in enumerate(LINEAGE)},
                lat=cat["lat"], lon=cat["lon"], month=cat["month"], hour=cat["hour"],
                date=cat["date"], elev=cat.get("elev"), reason=np.zeros(offset, np.int8),
                detail={}, extra_bad=[], ranks=ranks)
  for reason in REASONS:
    _mark_dict(split, 0, problems[reason], reason)
  return split


def _sha256(path: str) -> tuple[int, str]:
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      sha.update(chunk)
  return os.path.getsize(path), sha.hexdigest()


# ----------------------------------------------------------------------------- checks


def check_values(split: Split) -> None:
  """Marks rows whose coordinates or elevation are present but impossible."""
  present = ~np.isnan(split.lat) | ~np.isnan(split.lon)
  with np.errstate(invalid="ignore"):
    out = present & ((np.abs(split.lat) > 90) | (np.abs(split.lon) > 180)
                     | np.isinf(split.lat) | np.isinf(split.lon))
  split.mark(np.flatnonzero(out), "bad_coordinates",
             lambda r: f"lat {split.lat[r]}, lon {split.lon[r]} out of range")
  if split.elev is not None:
    lo, hi = ELEVATION_RANGE_M
    with np.errstate(invalid="ignore"):
      bad = ~np.isnan(split.elev) & ~((split.elev >= lo) & (split.elev <= hi))
    split.mark(np.flatnonzero(bad), "bad_elevation",
               lambda r: f"elevation {split.elev[r]} m outside [{lo:g}, {hi:g}]")


def check_duplicates(split: Split, earlier: np.ndarray | None = None) -> None:
  """Marks repeated image paths (after the first) and, for val, paths already in train."""
  ok = np.flatnonzero(split.reason != REASONS.index("bad_image_path") + 1)
  idents = split.ident[ok]
  order = np.argsort(idents, kind="stable")
  s = idents[order]
  dup = order[np.flatnonzero(np.r_[False, s[1:] == s[:-1]])]
  split.mark(ok[dup], "duplicate_image",
             lambda r: f"{split.ident[r].decode()} appears earlier in this source")
  if earlier is not None and len(earlier):
    e = np.sort(earlier)
    pos = np.minimum(np.searchsorted(e, idents), len(e) - 1)
    split.mark(ok[np.flatnonzero(e[pos] == idents)], "duplicate_image",
               lambda r: f"{split.ident[r].decode()} is also in the train source")


def check_image_files(split: Split, images_root: str, progress: Progress, mode: str = "decode",
                      workers: int = 0, chunk: int = _DECODE_CHUNK) -> None:
  """Marks the good rows whose image under `images_root` is missing (`missing_image_file`) or,
  with mode 'decode', cannot be fully decoded (`unreadable_image`; see `image_problem`).

  'exists' only stats the files (threads); 'decode' decodes them in `workers` processes (0: one
  per CPU), `chunk` images per task.
  """
  rows = np.flatnonzero(split.reason == 0)
  names = [os.path.join(images_root, split.ident[r].decode()) for r in rows]
  if mode == "exists":
    with futures.ThreadPoolExecutor(16) as pool:
      exists = np.fromiter(pool.map(os.path.isfile, names, chunksize=1024), bool, len(names))
    progress.show(f"{split.name}: checked {len(names):,} image files", force=True)
    split.mark(rows[~exists], "missing_image_file", lambda r: "image missing: " + os.path.join(
        images_root, split.ident[r].decode()) + " does not exist")
    return
  show = lambda done: progress.show(f"{split.name}: decoded {done:,} of {len(names):,} images "
                                    f"({100 * done / max(len(names), 1):.0f}%)")
  found = decode_problems(names, workers, chunk, show)
  progress.show(f"{split.name}: decoded {len(names):,} images, {len(found):,} bad", force=True)
  for i in sorted(found):
    split.mark([rows[i]], *found[i])


def image_problem(path: str) -> tuple[str, str] | None:
  """(reason, detail) when the image file at `path` is missing or PIL cannot open and fully
  load it (as training decodes it: truncated data is an error, LOAD_TRUNCATED_IMAGES off);
  None for a good image."""
  try:
    info = os.stat(path)
  except FileNotFoundError:  # a dangling link too
    return "missing_image_file", f"image missing: {path} does not exist"
  except OSError as e:
    return "unreadable_image", f"image unreadable: {e.strerror or e}"
  if not stat.S_ISREG(info.st_mode):
    return "missing_image_file", f"image missing: {path} is not a file"
  if info.st_size == 0:
    return "unreadable_image", "image unreadable: zero-byte file"
  try:
    with Image.open(path) as img:
      img.load()
  except Image.UnidentifiedImageError:
    return "unreadable_image", "image unreadable: not an image format PIL can read"
  except Exception as e:  # pylint: disable=broad-except  (whatever a damaged file raises)
    msg = " ".join(str(e).split()) or type(e).__name__
    if "truncated" in msg.lower():
      return "unreadable_image", f"image unreadable: truncated ({msg})"
    return "unreadable_image", f"image unreadable: {type(e).__name__}: {msg}"
  return None


def _strict_pil() -> None:
  """Decoding must fail on truncated data, as it does in training; refuse a process where
  something turned PIL's LOAD_TRUNCATED_IMAGES on."""
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise BuildError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process: truncated "
                     "images would pass the image check")


def _decode_chunk(paths: list[str]) -> list[tuple[int, str, str]]:
  """(index, reason, detail) of the bad images of `paths` (one task of a decoding process)."""
  _strict_pil()
  return [(i, *p) for i, p in enumerate(map(image_problem, paths)) if p is not None]


def decode_problems(paths: list[str], workers: int = 0, chunk: int = _DECODE_CHUNK,
                    on_progress=None) -> dict[int, tuple[str, str]]:
  """{index: (reason, detail)} of the images of `paths` that are missing or undecodable.

  Decoding is CPU-bound: chunks of `chunk` paths go to a pool of `workers` processes (0: one
  per CPU; spawned, so no forked copy of a multithreaded parent), a bounded window of tasks in
  flight; one chunk or one worker is decoded here. `on_progress(images done)` after each chunk.
  """
  _strict_pil()
  bounds = [(a, min(a + chunk, len(paths))) for a in range(0, len(paths), max(chunk, 1))]
  workers = min(workers if workers > 0 else (os.cpu_count() or 1), len(bounds))
  out, done = {}, 0

  def collect(a, b, found):
    nonlocal done
    out.update({a + i: (reason, detail) for i, reason, detail in found})
    done += b - a
    if on_progress:
      on_progress(done)

  if workers <= 1:
    for a, b in bounds:
      collect(a, b, _decode_chunk(paths[a:b]))
    return out
  ctx = multiprocessing.get_context("spawn")
  with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = collections.deque()

    def drain():
      a, b, task = pending.popleft()
      try:
        found = task.result()
      except futures.process.BrokenProcessPool as e:
        raise BuildError(f"a decoding process died checking the images {paths[a]} .. "
                         f"{paths[b - 1]} (a file that crashes the decoder?): {e}") from e
      collect(a, b, found)

    try:
      for a, b in bounds:
        pending.append((a, b, pool.submit(_decode_chunk, paths[a:b])))
        if len(pending) >= 4 * workers:
          drain()
      while pending:
        drain()
    finally:
      for *_, task in pending:
        task.cancel()
  return out


def bad_rows(split: Split) -> list[dict]:
  rows = np.flatnonzero(split.reason)
  return [{"split": split.name, "row": int(r), "image": split.ident[r].decode(errors="replace"),
           "reason": REASONS[split.reason[r] - 1], "detail": split.detail.get(int(r), "")}
          for r in rows] + split.extra_bad


def bad_counts(split: Split) -> dict[str, int]:
  counts = np.bincount(split.reason, minlength=len(REASONS) + 1)[1:]
  out = {r: int(c) for r, c in zip(REASONS, counts) if c}
  if split.extra_bad_count:
    out["annotation_unknown_image"] = split.extra_bad_count
  return out


def bad_row_error(splits: list[Split]) -> str:
  """The one message of a build stopped by bad rows: counts, then the first ERROR_LISTED."""
  listed = [b for s in splits for b in bad_rows(s)]
  counts = [f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in bad_counts(s).items())
            for s in splits if bad_counts(s)]
  total = sum(sum(bad_counts(s).values()) for s in splits)
  lines = [f"{total} bad rows ({'; '.join(counts)}); --on_bad_row=drop drops them and "
           "lists them all in build_report.json. The first ones:"]
  for b in listed[:ERROR_LISTED]:
    where = f"row {b['row']}" if b["row"] is not None else f"annotation {b['annotation']}"
    lines.append(f"{b['split']} {where} ({b['image'] if 'image' in b else ''}): {b['reason']}: "
                 f"{b['detail']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- encoding


def encode(split: Split, keep: np.ndarray, ranks, hours: bool, opts: Options) -> dict:
  """The labels.h5 datasets of the rows `keep` of `split`: name -> (array, attrs)."""
  lat, lon = split.lat[keep], split.lon[keep]
  month, hour, raw_date = split.month[keep], split.hour[keep], split.date[keep]
  spatial_ok = np.isfinite(lat) & np.isfinite(lon)
  dated = month > 0
  out = {"img_identifiers": (split.ident[keep], {})}
  for level in ranks:
    out[f"taxa_L{level}"] = (split.taxa[level][keep].astype(np.uint32), {})
  temporal = encoders.temporal(month=np.where(dated, month, 12),
                               hour=np.where(hour >= 0, hour, 0) if hours else None)
  temporal[~dated] = 0.0  # missing: the original's null form, marked by raw_date_observed == ''
  if hours:
    temporal[dated & (hour < 0), 2:] = np.nan  # a date without a time: hour unknown
  names = ["month_sin", "month_cos"] + (["hour_sin", "hour_cos"] if hours else [])
  out["temporal"] = (temporal, {"column_names": names, "method": "sinusoidal"})
  spatial = encoders.spatial(np.where(spatial_ok, lat, 0.0), np.where(spatial_ok, lon, 0.0))
  spatial[~spatial_ok] = 0.0
  out["spatial"] = (spatial, {"column_names": ["spatial_x", "spatial_y", "spatial_z"],
                              "method": "unit_sphere"})
  if split.elev is not None:
    elev = split.elev[keep]
    known = np.isfinite(elev)
    values = encoders.elevation(np.where(known, elev, 0.0), opts.elevation_scales)
    values[~known] = encoders.original_null_form("ELEVATION", values.shape[1])
    out[f"elevation_{opts.elevation_set}"] = (values, {
        "column_names": encoders.elevation_column_names(opts.elevation_scales),
        "method": "sinusoidal", "scales": np.asarray(opts.elevation_scales, np.float32)})
    out["raw_elevation"] = (elev.astype(np.float32), {})
  out["raw_lat"] = (lat.astype(np.float32), {})
  out["raw_lon"] = (lon.astype(np.float32), {})
  out["raw_date_observed"] = (raw_date, {})
  if opts.bbox:
    out["in_region"] = (in_region(lat, lon, opts.bbox), {})
  return out


def in_region(lat: np.ndarray, lon: np.ndarray, bbox) -> np.ndarray:
  """(N,) uint8: 1 inside the box (min_lon > max_lon crosses 180) or location unknown."""
  lat0, lat1, lon0, lon1 = bbox
  with np.errstate(invalid="ignore"):
    in_lon = ((lon >= lon0) & (lon <= lon1)) if lon0 <= lon1 else ((lon >= lon0) | (lon <= lon1))
    inside = (lat >= lat0) & (lat <= lat1) & in_lon
  unknown = ~(np.isfinite(lat) & np.isfinite(lon))
  return (inside | unknown).astype(np.uint8)


def write_labels(path: str, datasets: dict, meta: dict) -> None:
  """Writes the datasets (in the layout of data/synthetic.py) and a /metadata group."""
  string_dt = h5py.string_dtype()
  step = 1 << 18
  with h5py.File(path, "w") as h5:
    for name, (data, attrs) in datasets.items():
      if data.dtype.kind == "S":  # variable-length UTF-8 strings, written in slices
        ds = h5.create_dataset(name, (len(data),), dtype=string_dt)
        for a in range(0, len(data), step):
          ds[a:a + step] = data[a:a + step].astype(object)
      else:
        ds = h5.create_dataset(name, data=data)
      for k, v in attrs.items():
        ds.attrs[k] = v
    h5.create_group("metadata").attrs["config_json"] = json.dumps(meta)


def class_indices(columns: list[np.ndarray], partial: bool) -> tuple[np.ndarray, int, dict]:
  """As the loader (labels._class_maps): sorted non-zero ids -> indices (+1 with a null class)."""
  all_ids = np.concatenate(columns)
  ids, inv = np.unique(all_ids, return_inverse=True)
  has_zero = bool(len(ids)) and ids[0] == 0
  real = ids[1:] if has_zero else ids
  idx = inv - int(has_zero) + int(partial)
  if has_zero and partial:
    idx[inv == 0] = 0
  names = {k + int(partial): int(i) for k, i in enumerate(real)}
  return idx.astype(np.int64), len(real) + int(partial), names


def taxonomy_tree(tables: list[dict], ranks, partial: bool) -> taxonomy_lib.TaxonomyTree:
  """The tree training would build from these files with data.partial.levels=`partial`
  (without it, rows with an unknown rank are dropped by the loader: not linked here either)."""
  tasks = [f"taxa_L{r}" for r in ranks]
  labels, num, names = [], {}, {}
  for t in tasks:
    idx, num[t], names[t] = class_indices([tb[t][0] for tb in tables], partial)
    labels.append(idx)
  labels = np.stack(labels, 1)
  if not partial:
    labels = labels[np.all(labels >= 0, axis=1)]
  try:
    return taxonomy_lib.TaxonomyTree.from_labels(labels, tasks, num, null_class=partial,
                                                 names=names)
  except taxonomy_lib.TaxonomyError as e:
    raise BuildError(f"{e} (taxa given by id with inconsistent parents)") from e


# ----------------------------------------------------------------------------- build


def _read(opts: Options, name: str, path: str, locations: str, taxa: Taxa, progress,
          hashes) -> Split:
  if opts.format == "inat":
    return read_inat(name, path, locations, opts.categories, opts.images_root, taxa, progress,
                     hashes)
  return read_table(name, path, opts.columns, opts.images_root, taxa, progress, hashes)


def _ranks(opts: Options, have: tuple) -> tuple:
  if opts.ranks:
    missing = [r for r in opts.ranks if r not in have]
    if missing:
      raise BuildError(f"--ranks: the source has no {[_rank_name(r) for r in missing]} "
                       f"(it has {[_rank_name(r) for r in have]})")
    return tuple(sorted(opts.ranks))
  return tuple(r for r in DEFAULT_RANKS if r in have)


def _rank_name(level: int) -> str:
  return {v: k for k, v in RANKS.items()}[level]


def _validity(tables: dict, hours: bool, has_elev: bool) -> dict:
  dates_ok = np.char.str_len(tables["raw_date_observed"][0]) > 0
  out = {"SPATIAL": np.isfinite(tables["raw_lat"][0]) & np.isfinite(tables["raw_lon"][0]),
         "TEMPORAL": dates_ok}
  if hours:
    out["TEMPORAL_HOUR"] = np.all(np.isfinite(tables["temporal"][0]), axis=1) & dates_ok
  if has_elev:
    out["ELEVATION"] = np.isfinite(tables["raw_elevation"][0])
  return {k: float(v.mean()) if len(v) else 0.0 for k, v in out.items()}


def image_check_mode(opts: Options) -> str:
  """How the images are checked: 'decode' with --pack_images (an image packed must decode) or
  --check_images in decode mode, 'exists', or '' (not checked)."""
  if opts.pack_images:
    return "decode"
  return opts.check_images_mode if opts.check_images else ""


def out_not_empty(out: str) -> str:
  """The one-line refusal of a non-empty `out` (without --overwrite), or '' when it is absent
  or empty."""
  try:
    names = os.listdir(out)
  except (FileNotFoundError, NotADirectoryError):
    return ""
  if not names:
    return ""
  example = next((n for n in ("labels.h5", "build_report.json") if n in names), min(names))
  return (f"--out {out} is not empty ({len(names)} file{'s' if len(names) > 1 else ''}, e.g. "
          f"{example}); pass --overwrite to replace the earlier build")


def _new_folder(target: str) -> str:
  """An empty hidden sibling folder of `target` (same file system: renamed into place), with
  the mode of `target` when it exists."""
  parent, base = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  path = os.path.join(parent, f".{base}.building-{os.getpid()}-{secrets.token_hex(4)}")
  os.mkdir(path)
  if os.path.isdir(target):
    os.chmod(path, stat.S_IMODE(os.stat(target).st_mode))
  return path


def swap_in(work: str, opts: Options) -> None:
  """Makes the complete build in folder `work` the folder --out. Absent or empty --out: one
  atomic rename. Non-empty: refused without --overwrite; with it the earlier build is renamed
  aside, `work` renamed in (the earlier one put back if that fails), then deleted."""
  target = os.path.realpath(opts.out)
  try:
    os.replace(work, target)  # rename(2) replaces an empty folder, never a non-empty one
    return
  except OSError as e:
    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
      raise
  if not opts.overwrite:
    raise BuildError(out_not_empty(opts.out) or f"--out {opts.out} is not empty")
  parent, base = os.path.split(target)
  old = os.path.join(parent, f".{base}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
  os.rename(target, old)
  try:
    os.rename(work, target)
  except BaseException:
    os.rename(old, target)
    raise
  try:
    shutil.rmtree(old)
  except OSError as e:
    print(f"build: warning: the earlier build, moved to {old}, could not be deleted: {e}",
          file=sys.stderr)


def _read_splits(opts: Options, taxa: Taxa, progress: Progress, hashes: dict) -> list[Split]:
  """[train] or [train, val] as read from the sources."""
  splits = [_read(opts, "train", opts.source, opts.locations, taxa, progress, hashes)]
  if opts.val_source:
    splits.append(_read(opts, "val", opts.val_source, opts.val_locations, taxa, progress,
                        hashes))
  return splits


def _check_rows(splits: list[Split], opts: Options, progress: Progress) -> str:
  """Marks the bad rows of every split: impossible values, duplicates (within train, and val
  images already in train) and, when checked, image files; raises listing them unless
  --on_bad_row=drop. The image check mode (`image_check_mode`)."""
  for s in splits:
    check_values(s)
  check_duplicates(splits[0])
  if len(splits) > 1:
    check_duplicates(splits[1], splits[0].ident[splits[0].reason == 0])
  mode = image_check_mode(opts)
  if mode:
    for s in splits:
      check_image_files(s, opts.images_root, progress, mode)
  if any(np.any(s.reason) or bad_counts(s) for s in splits) and opts.on_bad_row == "error":
    progress.done()
    raise BuildError(bad_row_error(splits))
  return mode


def _kept_rows(splits: list[Split]) -> list[np.ndarray]:
  """Per split, the rows without a bad-row reason; a split left empty is an error."""
  keeps = [np.flatnonzero(s.reason == 0) for s in splits]
  for s, keep in zip(splits, keeps):
    if not len(keep):
      raise BuildError(f"{s.name}: no rows left after dropping the bad ones")
  return keeps


def _temporal_hours(opts: Options, splits: list[Split], keeps: list[np.ndarray]) -> bool:
  """Whether `temporal` gets hour columns: --temporal_hours, or with 'auto' whether any kept
  row's date has a time."""
  if opts.temporal_hours == "auto":
    return any(np.any((s.hour[k] >= 0) & (s.month[k] > 0)) for s, k in zip(splits, keeps))
  return opts.temporal_hours == "true"


def _partial_levels(opts: Options, tables: list[dict], tasks: list[str]) -> bool:
  """Whether the taxonomy has a null class: --partial_levels, or with 'auto' whether any
  written row has an unknown rank."""
  return (opts.partial_levels == "true" or opts.partial_levels == "auto" and any(
      np.any(tb[t][0] == 0) for tb in tables for t in tasks))


def _taxa_json(taxa: Taxa, tables: list[dict], ranks) -> dict:
  """taxa.json: {task: {raw id: name and lineage}} of the non-null ids the written files use."""
  names = {}
  for r in ranks:
    used = set(np.unique(np.concatenate([tb[f"taxa_L{r}"][0] for tb in tables])).tolist())
    names[f"taxa_L{r}"] = {str(i): taxa.names[r].get(i, {}) for i in sorted(used) if i}
  return names


def _report(opts: Options, splits: list[Split], keeps: list[np.ndarray], files: list[str],
            tables: list[dict], tasks: list[str], hashes: dict, hours: bool, partial: bool,
            mode: str, shards: dict) -> dict:
  """build_report.json: the sources, what was written, and per split the rows read, written
  and dropped (why), taxa and metadata validity; every dropped row; the options."""
  has_elev = splits[0].elev is not None
  return {
      "format": opts.format,
      "sources": [{"path": os.path.abspath(p), "bytes": h[0], "sha256": h[1]}
                  for p, h in hashes.items()],
      "ranks": list(tasks),
      "temporal_columns": tables[0]["temporal"][1]["column_names"],
      "elevation": (f"elevation_{opts.elevation_set}" if has_elev else None),
      "partial_levels": bool(partial),
      "images_root": os.path.abspath(opts.images_root) if opts.images_root else "",
      "image_check": mode or None,
      "splits": {s.name: {
          "file": f, "rows_read": len(s), "rows_written": int(len(k)),
          "dropped": bad_counts(s),
          "taxa": {t: {"taxa": int(len(np.unique(tb[t][0][tb[t][0] != 0]))),
                       "null_rows": int(np.sum(tb[t][0] == 0))} for t in tasks},
          "validity": _validity(tb, hours, has_elev),
      } for s, k, f, tb in zip(splits, keeps, files, tables)},
      "dropped_rows": [b for s in splits for b in bad_rows(s)],
      "shards": shards,
      "options": {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(opts).items() if k != "progress"},
  }


def _write_texts(folder: str, texts: dict[str, str]) -> None:
  """Writes each {file name: text} into `folder` as UTF-8."""
  for name, text in texts.items():
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      f.write(text)


def build(opts: Options) -> dict:
  """Reads the sources, checks every row, writes the dataset into a new folder that replaces
  opts.out at the end (`swap_in`); the report."""
  opts.validate()
  if not opts.overwrite and out_not_empty(opts.out):  # before the sources are read
    raise BuildError(out_not_empty(opts.out))
  progress, hashes, taxa = Progress(opts.progress), {}, Taxa()
  splits = _read_splits(opts, taxa, progress, hashes)
  have = tuple(r for r in splits[0].ranks if all(r in s.ranks for s in splits))
  ranks = _ranks(opts, have)
  if not ranks:
    raise BuildError(f"no rank to write: the source has {[_rank_name(r) for r in have]}; "
                     "ask for them with --ranks")
  mode = _check_rows(splits, opts, progress)
  keeps = _kept_rows(splits)
  hours = _temporal_hours(opts, splits, keeps)
  tables = [encode(s, k, ranks, hours, opts) for s, k in zip(splits, keeps)]
  tasks = [f"taxa_L{r}" for r in ranks]
  partial = _partial_levels(opts, tables, tasks)
  tree = taxonomy_tree(tables, ranks, partial)

  files = ["labels.h5"] + (["labels_val.h5"] if len(splits) > 1 else [])
  meta = {"builder": "linnaeus_jax.data.build", "format": opts.format,
          "sources": {p: h[1] for p, h in hashes.items()}}
  work = _new_folder(os.path.realpath(opts.out))
  try:
    for name, table in zip(files, tables):
      progress.show(f"writing {name}", force=True)
      write_labels(os.path.join(work, name), table, meta)
    shards = pack_images(opts, tables, files, work) if opts.pack_images else {}
    report = _report(opts, splits, keeps, files, tables, tasks, hashes, hours, partial, mode,
                     shards)
    _write_texts(work, {"taxonomy_tree.json": tree.to_json(),
                        "taxa.json": json.dumps(_taxa_json(taxa, tables, ranks), indent=1),
                        "build_report.json": json.dumps(report, indent=1)})
    swap_in(work, opts)
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    raise
  progress.show(", ".join(f"{s.name} {len(k):,} of {len(s):,} rows" for s, k in
                          zip(splits, keeps)) + f" -> {opts.out}", force=True)
  progress.done()
  return report


def pack_images(opts: Options, tables: list[dict], files: list[str], out_dir: str) -> dict:
  """The images of each split as a shard set in `out_dir` (data/shards.py), rows in labels
  order."""
  from linnaeus_jax.data import shards  # pylint: disable=g-import-not-at-top
  out = {}
  for name, table in zip(files, tables):
    prefix = "images" if name == "labels.h5" else "images_val"
    paths = [os.path.join(opts.images_root, x.decode()) for x in table["img_identifiers"][0]]
    written = shards.pack(paths, out_dir, prefix, opts.shard_size, opts.max_side,
                          progress=opts.progress)
    out[prefix] = [os.path.basename(p) for p in written]
  return out


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values=None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values  # an empty FlagValues is falsy
  flags.DEFINE_enum("format", None, ["inat", "table"], "Source format: iNat competition JSON "
                    "or a CSV/Parquet table.", flag_values=fv)
  flags.DEFINE_string("source", None, "Train source file (JSON, .csv, .parquet).", flag_values=fv)
  flags.DEFINE_string("val_source", "", "Validation source file (writes labels_val.h5).",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_string("images_root", "", "Folder the image paths are relative to.",
                      flag_values=fv)
  flags.DEFINE_string("locations", "", "inat 2017/2018: locations JSON of --source.",
                      flag_values=fv)
  flags.DEFINE_string("val_locations", "", "inat 2017/2018: locations JSON of --val_source.",
                      flag_values=fv)
  flags.DEFINE_string("categories", "", "inat: categories JSON with the full taxonomy (2018's "
                      "categories.json), instead of the source's categories.", flag_values=fv)
  flags.DEFINE_string("columns", "", "table: key=column,... or a .json/.yaml mapping; keys "
                      + ", ".join(TABLE_KEYS) + ". Default: the columns named like the keys.",
                      flag_values=fv)
  flags.DEFINE_list("ranks", [], "Ranks to write (names or levels: species=10 ... kingdom=70); "
                    "default: species, genus, family, order where the source has them.",
                    flag_values=fv)
  flags.DEFINE_enum("on_bad_row", "error", ["error", "drop"], "Bad rows: stop listing them, "
                    "or drop them and list them in build_report.json.", flag_values=fv)
  flags.DEFINE_bool("check_images", False, "Bad row when the image file is missing or, in the "
                    "default --check_images_mode=decode, cannot be fully decoded (one process "
                    "per CPU). --pack_images always decodes.", flag_values=fv)
  flags.DEFINE_enum("check_images_mode", "decode", list(CHECK_MODES), "--check_images: decode "
                    "every image, or only check that the file exists (fast).", flag_values=fv)
  flags.DEFINE_list("bbox", [], "min_lat,max_lat,min_lon,max_lon: writes in_region.",
                    flag_values=fv)
  flags.DEFINE_list("elevation_scales", [f"{s:g}" for s in DEFAULT_ELEVATION_SCALES],
                    "Elevation encoding scales in metres.", flag_values=fv)
  flags.DEFINE_string("elevation_set", "broadrange_2", "Elevation dataset: elevation_<set>.",
                      flag_values=fv)
  flags.DEFINE_enum("temporal_hours", "auto", ["auto", "true", "false"], "Hour columns in "
                    "temporal (auto: when any date has a time).", flag_values=fv)
  flags.DEFINE_enum("partial_levels", "auto", ["auto", "true", "false"], "taxonomy_tree.json "
                    "for data.partial.levels (auto: true when some rank is unknown).",
                    flag_values=fv)
  flags.DEFINE_bool("pack_images", False, "Also pack the images into HDF5 shards in --out.",
                    flag_values=fv)
  flags.DEFINE_integer("shard_size", 10_000, "--pack_images: images per shard.", flag_values=fv)
  flags.DEFINE_integer("max_side", 0, "--pack_images: shrink images whose short side exceeds "
                       "this (0: copy the files).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out as a whole (no file of the "
                    "earlier build remains); without it a non-empty --out is refused.",
                    flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress line on stderr.", flag_values=fv)
  flags.mark_flags_as_required(["format", "source", "out"], flag_values=fv)


def options_from_flags(fv) -> Options:
  """Options from parsed flags; BuildError names a malformed value."""
  ranks = []
  for r in fv.ranks:
    r = r.strip().lower()
    level = RANKS.get(r) if not r.isdigit() else int(r)
    if level not in RANKS.values():
      raise BuildError(f"--ranks: unknown rank {r!r}; known: "
                       + ", ".join(f"{k} ({v})" for k, v in RANKS.items()))
    ranks.append(level)
  try:
    bbox = tuple(float(v) for v in fv.bbox)
    scales = tuple(float(v) for v in fv.elevation_scales)
  except ValueError:
    raise BuildError("--bbox and --elevation_scales take comma-separated numbers") from None
  if bbox and len(bbox) != 4:
    raise BuildError("--bbox takes 4 numbers: min_lat,max_lat,min_lon,max_lon")
  if fv["check_images_mode"].present and not fv.check_images:
    raise BuildError("--check_images_mode needs --check_images")
  columns = parse_columns(fv.columns)
  if fv.format == "table" and not columns:
    columns = _default_columns(fv.source)
  return Options(format=fv.format, source=fv.source, out=fv.out, val_source=fv.val_source,
                 images_root=fv.images_root, locations=fv.locations,
                 val_locations=fv.val_locations, categories=fv.categories, columns=columns,
                 ranks=tuple(dict.fromkeys(ranks)), on_bad_row=fv.on_bad_row,
                 check_images=fv.check_images, check_images_mode=fv.check_images_mode,
                 bbox=bbox, elevation_scales=scales,
                 elevation_set=fv.elevation_set, temporal_hours=fv.temporal_hours,
                 partial_levels=fv.partial_levels, pack_images=fv.pack_images,
                 shard_size=fv.shard_size, max_side=fv.max_side, overwrite=fv.overwrite,
                 progress=fv.progress)


def _default_columns(path: str) -> tuple:
  """Without --columns: the table's columns that are named like the keys."""
  if not os.path.isfile(path):
    raise BuildError(f"--source={path}: no such file")
  if path.endswith((".parquet", ".pq")):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    names = pq.ParquetFile(path).schema_arrow.names
  else:
    import csv  # pylint: disable=g-import-not-at-top
    with open(path, newline="", encoding="utf-8-sig") as f:
      names = next(csv.reader(f), [])
  return tuple(sorted((k, k) for k in TABLE_KEYS if k in names))


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  opts = cli.call(options_from_flags, flags.FLAGS)
  cli.call(build, opts)


if __name__ == "__main__":
  define_flags()
  from linnaeus_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  _cli.run(main)
