"""Images packed into sharded HDF5 files of encoded bytes: writing (`pack`) and reading.

Why: a folder of millions of small files is slow to list, copy and read on network and
distributed file systems; a few hundred files of about 1 GB each are not. The bytes stay
encoded (JPEG as it was), so the set is no larger than the folder, and decoding goes through
`preprocessing.to_rgb_uint8` exactly as for a file: same pixels.

Layout: `<out_dir>/<prefix>-00000-of-000NN.h5`, ...; each shard holds the encoded images of its
rows end to end in a uint8 dataset `bytes` (contiguous, uncompressed), a dataset `offsets`
(int64, num_rows + 1: row j is bytes[offsets[j]:offsets[j + 1]]) and the attributes `first_row`,
`num_rows`, `total_rows` (rows of the whole set) and `encoding="encoded"`. Row r of the set is
row r of its labels file. Not a variable-length dataset: h5py spends ~0.2 ms on each
variable-length read, several times the cost of reading the file; a row of `bytes` is read with
one os.pread at the dataset's offset in the file, cheaper than opening and reading a file.

A reader takes the shard files in any order (a glob, a comma-separated string or a list), checks
that their rows tile 0..total_rows-1, and opens each shard lazily, per process, on first use
(h5py handles cannot be pickled or shared across fork).
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import io
import os
import re
import resource
import sys
import threading
import time
from typing import Iterable, Sequence

import h5py
import numpy as np
from PIL import Image

from linnaeus_jax import preprocessing

ENCODING = "encoded"
# Rows per shard: about 1 GB for iNat-sized images (~100 KB each: 500 px on the long side).
# Aim for shards of 0.5-2 GB (fewer, larger files for network file systems; more, smaller ones
# when files are staged per host): rows = target bytes / mean image size.
DEFAULT_SHARD_SIZE = 10_000
JPEG_QUALITY = 95  # re-encoding quality of images pack() resizes
_WRITE_BATCH = 64  # rows per reading task and HDF5 write call
_NAME = re.compile(r"-\d{5,}-of-\d{5,}\.h5")


class ShardError(ValueError):
  """A problem with a shard set; the message lists every problem found."""


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.h5"


def _read_image(path: str, max_side: int) -> bytes:
  """The encoded bytes to store for one file: as they are, or resized and re-encoded. The
  re-encoded JPEG carries no EXIF, so its pixels are turned upright first (EXIF orientation,
  `preprocessing.upright`): a reader sees the picture as the file displays either way."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ShardError(f"image file {path!r} cannot be read: {e}") from e
  if max_side <= 0:
    return data
  try:
    with Image.open(io.BytesIO(data)) as img:
      w, h = img.size
      if min(w, h) <= max_side:
        return data
      img.load()
      rgb = preprocessing._rgb_image(preprocessing.upright(img))  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except  (any undecodable file)
    raise ShardError(f"image file {path!r} cannot be decoded: {e}") from e
  w, h = rgb.size  # sides swapped by orientations 5-8
  size = ((max_side, max(1, round(h * max_side / w))) if w <= h else
          (max(1, round(w * max_side / h)), max_side))
  out = io.BytesIO()
  rgb.resize(size, Image.Resampling.BOX).save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def _read_batch(paths: Sequence[str], max_side: int) -> tuple[np.ndarray, np.ndarray]:
  """(lengths, the images end to end as uint8) of `paths`, in a reading thread. Files copied as
  they are are read straight into the batch's buffer (no intermediate copy)."""
  if max_side > 0:
    images = [_read_image(p, max_side) for p in paths]
    return (np.array([len(x) for x in images], np.int64),
            np.frombuffer(b"".join(images), np.uint8))
  try:
    lengths = np.array([os.path.getsize(p) for p in paths], np.int64)
  except OSError:  # name the file
    for p in paths:
      _read_image(p, 0)
    raise
  buf = np.empty(int(lengths.sum()), np.uint8)
  view, pos = memoryview(buf), 0
  for p, n in zip(paths, lengths.tolist()):
    try:
      with open(p, "rb", buffering=0) as f:
        got = f.readinto(view[pos:pos + n])
        changed = got != n or f.read(1)
    except OSError as e:
      raise ShardError(f"image file {p!r} cannot be read: {e}") from e
    if changed:
      raise ShardError(f"image file {p!r} changed size while being packed")
    pos += n
  return lengths, buf


def _batches(paths: Sequence[str], bounds: Sequence[tuple[int, int]], max_side: int,
             workers: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  """`_read_batch` of paths[lo:hi] for each (lo, hi) of `bounds`, in order: one task per batch
  (per-file tasks cost more than reading a file from the page cache), `workers` threads, a
  bounded window ahead."""
  read = lambda lo, hi: _read_batch(paths[lo:hi], max_side)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    ahead = collections.deque()
    try:
      for lo, hi in bounds:
        ahead.append(pool.submit(read, lo, hi))
        if len(ahead) > 2 * workers:
          yield ahead.popleft().result()
      while ahead:
        yield ahead.popleft().result()
    finally:
      for f in ahead:
        f.cancel()


class _Progress:
  """Rows/s and MB/s on stderr: one rewritten line on a terminal, a line per 30 s otherwise."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.tty = enabled and sys.stderr.isatty()
    self.t0 = self.last = time.time()
    self.rows = self.bytes = 0

  def update(self, rows: int, nbytes: int, final: bool = False) -> None:
    self.rows += rows
    self.bytes += nbytes
    now = time.time()
    if not self.enabled or not (final or now - self.last >= (1 if self.tty else 30)):
      return
    self.last = now
    dt = max(now - self.t0, 1e-9)
    line = (f"packed {self.rows}/{self.total} images, {self.rows / dt:,.0f} images/s, "
            f"{self.bytes / dt / 1e6:,.1f} MB/s")
    print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "",
          file=sys.stderr, flush=True)


def _file_sizes(paths: Sequence[str]) -> np.ndarray:
  sizes = np.zeros(len(paths), np.int64)
  for i, p in enumerate(paths):
    try:
      sizes[i] = os.path.getsize(p)
    except OSError as e:
      raise ShardError(f"image file {p!r} cannot be read: {e}") from e
  return sizes


def _create(h5: h5py.File, offsets: np.ndarray):
  """The contiguous `bytes` dataset of a shard (readers can then read it with one pread) and
  its `offsets`."""
  h5.create_dataset("offsets", data=offsets)
  return h5.create_dataset("bytes", (int(offsets[-1]),), np.uint8, fill_time="never")


def _write_copied(path: str, paths: Sequence[str], batches, prog: _Progress) -> None:
  """One shard of files copied as they are: sizes known up front, written in place."""
  offsets = np.concatenate([[0], np.cumsum(_file_sizes(paths))])
  with h5py.File(path, "w") as h5:
    data = _create(h5, offsets)
    for a in range(0, len(paths), _WRITE_BATCH):
      lengths, buf = next(batches)
      changed = np.flatnonzero(np.diff(offsets[a:a + len(lengths) + 1]) != lengths)
      if len(changed):
        raise ShardError(f"image file {paths[a + changed[0]]!r} changed size while being packed")
      if len(buf):
        data.write_direct(buf, dest_sel=np.s_[offsets[a]:offsets[a + len(lengths)]])
      prog.update(len(lengths), len(buf))


def _write_resized(path: str, paths: Sequence[str], batches, prog: _Progress) -> None:
  """One shard of re-encoded images: sizes known only once encoded, so the bytes go to a
  temporary flat file first, then into the contiguous dataset (a small cost next to encoding)."""
  lengths = []
  with open(path + ".raw", "wb") as raw:
    for _ in range(0, len(paths), _WRITE_BATCH):
      batch_lengths, buf = next(batches)
      raw.write(buf)
      lengths.append(batch_lengths)
      prog.update(len(batch_lengths), len(buf))
  offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
  block = 64 << 20
  with h5py.File(path, "w") as h5:
    data = _create(h5, offsets)
    for pos in range(0, int(offsets[-1]), block):
      buf = np.fromfile(path + ".raw", np.uint8, count=min(block, int(offsets[-1]) - pos),
                        offset=pos)
      data.write_direct(buf, dest_sel=np.s_[pos:pos + len(buf)])
  os.remove(path + ".raw")


def pack(image_paths: Sequence[str], out_dir: str, prefix: str = "images",
         shard_size: int = DEFAULT_SHARD_SIZE, max_side: int = 0, progress: bool = True,
         num_workers: int = 0, overwrite: bool = False) -> list[str]:
  """Writes the images of `image_paths` (row i = image_paths[i]) as a shard set; its paths.

  `shard_size`: rows per shard (DEFAULT_SHARD_SIZE: ~1 GB at ~100 KB per image). `max_side` 0
  copies each file's bytes as they are; > 0 shrinks images whose short side exceeds it to that
  short side (aspect kept, PIL BOX filter, alpha dropped as in training, turned upright as
  their EXIF orientation says) and re-encodes them as JPEG quality 95 without EXIF; smaller
  images are copied (readers apply their orientation). `num_workers` reading threads (0: one
  per CPU), each holding up to two batches of 64 images in memory.
  Shards are written under temporary names and renamed at the end, so a failure leaves no
  partial set. An existing set with this prefix in `out_dir` is an error unless `overwrite`, which
  removes it once the new set is complete. Raises ShardError naming a file that cannot be read
  (or, when resizing, decoded).
  """
  paths = [os.fspath(p) for p in image_paths]
  if not paths:
    raise ShardError("no images to pack")
  if shard_size < 1:
    raise ShardError(f"shard_size must be >= 1, got {shard_size}")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, prefix)
  old = sorted(p for p in glob.glob(glob.escape(stem) + "-*") if _NAME.fullmatch(p[len(stem):]))
  if old and not overwrite:
    raise ShardError(f"{out_dir} already holds {len(old)} shard file(s) with prefix {prefix!r} "
                     f"({os.path.basename(old[0])}, ...): remove them or pass overwrite=True")
  n = len(paths)
  count = -(-n // shard_size)
  final = [os.path.join(out_dir, shard_name(prefix, s, count)) for s in range(count)]
  temps = [f"{p}.tmp{os.getpid()}" for p in final]
  workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
  prog = _Progress(n, progress)
  bounds = [(lo, min(lo + _WRITE_BATCH, first + rows)) for first, rows in
            ((s * shard_size, min(shard_size, n - s * shard_size)) for s in range(count))
            for lo in range(first, first + rows, _WRITE_BATCH)]
  batches = _batches(paths, bounds, max_side, workers)
  try:
    for s in range(count):
      first = s * shard_size
      rows = min(shard_size, n - first)
      write = _write_copied if max_side <= 0 else _write_resized
      write(temps[s], paths[first:first + rows], batches, prog)
      with h5py.File(temps[s], "r+") as h5:
        h5.attrs.update(first_row=first, num_rows=rows, total_rows=n, encoding=ENCODING)
  except BaseException:
    batches.close()  # stops the reading threads
    for t in temps + [t + ".raw" for t in temps]:
      if os.path.exists(t):
        os.remove(t)
    raise
  for p in old:
    if p not in final:
      os.remove(p)
  for t, p in zip(temps, final):
    os.replace(t, p)
  prog.update(0, 0, final=True)
  return final


# ----------------------------------------------------------------------------- Reading

def is_set(location) -> bool:
  """Whether `location` names several files (a list, commas or a glob pattern)."""
  if not isinstance(location, str):
    return True
  return "," in location or glob.has_magic(location)


def expand(location: str | Sequence[str]) -> tuple[list[str], list[str]]:
  """(files, problems): a comma-separated string or a list of paths and globs, globs sorted."""
  parts = location.split(",") if isinstance(location, str) else list(location)
  files, problems = [], []
  for part in (os.fspath(p).strip() for p in parts):
    if not part:
      continue
    if os.path.exists(part) or not glob.has_magic(part):
      files.append(part)
      continue
    matched = sorted(glob.glob(part))
    if not matched:
      problems.append(f"no image shard files match {part!r}")
    files += matched
  if not files and not problems:
    problems.append(f"no image shard files in {location!r}")
  return files, problems


def is_shard_file(path: str) -> bool:
  """Whether `path` is an HDF5 file written by `pack` (attribute encoding='encoded')."""
  try:
    with h5py.File(path, "r", locking=False) as h5:
      enc = h5.attrs.get("encoding")
  except OSError:
    return False
  return (enc.decode() if isinstance(enc, bytes) else enc) == ENCODING


def _inspect(path: str, deep: bool) -> tuple[dict | None, list[str]]:
  """One shard's (first_row, num_rows, total_rows) and its problems; `deep` reads the offsets
  to check them too."""
  try:
    h5 = h5py.File(path, "r", locking=False)
  except OSError as e:
    return None, [f"cannot open image shard {path}: {e}"]
  with h5:
    missing = [k for k in ("first_row", "num_rows", "total_rows", "encoding") if k not in h5.attrs]
    problems = [f"{path}: missing attribute(s) {', '.join(missing)} (not written by shards.pack?)"
                ] if missing else []
    enc = h5.attrs.get("encoding", ENCODING)
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    if enc != ENCODING:
      problems.append(f"{path}: encoding is {enc!r}, expected {ENCODING!r}")
    absent = [k for k in ("bytes", "offsets") if k not in h5]
    if absent:
      return None, problems + [f"{path}: missing dataset(s) {', '.join(absent)}"]
    data, offsets = h5["bytes"], h5["offsets"]
    if data.ndim != 1 or data.dtype != np.uint8:
      problems.append(f"{path}: bytes has shape {data.shape} and dtype {data.dtype}, expected "
                      "(total bytes,) uint8")
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
      problems.append(f"{path}: offsets has shape {offsets.shape} and dtype {offsets.dtype}, "
                      "expected (num_rows + 1,) integers")
    if missing:
      return None, problems
    info = {k: int(h5.attrs[k]) for k in ("first_row", "num_rows", "total_rows")}
    if not problems and offsets.shape[0] != info["num_rows"] + 1:
      problems.append(f"{path}: offsets has {offsets.shape[0]} entries but num_rows is "
                      f"{info['num_rows']} (expected num_rows + 1)")
    elif not problems and deep:
      o = offsets[:]
      if o[0] != 0 or np.any(np.diff(o) < 0) or o[-1] != data.shape[0]:
        problems.append(f"{path}: offsets must rise from 0 to the length of bytes "
                        f"({data.shape[0]}); they go from {o[0]} to {o[-1]}"
                        + (" and decrease somewhere" if np.any(np.diff(o) < 0) else ""))
    return info, problems


def layout(files: Sequence[str], n_rows: int | None = None, deep: bool = False):
  """(files sorted by first_row, their first rows, total rows) of a shard set, checked.

  The shards must tile 0..total_rows-1 without gaps or overlaps, agree on total_rows and, when
  given, hold `n_rows` rows (those of the labels file); `deep` also reads every shard's offsets
  (the start-up check does; readers, built several times, do not). Raises ShardError listing
  every problem.
  """
  if not files:
    raise ShardError("image shard set: no files")
  infos, problems = [], []
  for f in files:
    info, more = _inspect(f, deep)
    problems += more
    if info is not None:
      infos.append((info["first_row"], info["num_rows"], info["total_rows"], f))
  infos.sort()
  totals = sorted({t for _, _, t, _ in infos})
  if len(totals) > 1:
    problems.append(f"shards disagree on total_rows: {totals}")
  total = totals[-1] if totals else 0
  if len(totals) == 1:  # with unreadable shards too: their rows show as gaps
    expected = 0
    for first, num, _, f in infos:
      if first > expected:
        problems.append(f"rows {expected}..{first - 1} are in no shard (gap before {f})")
      elif first < expected:
        problems.append(f"{f}: rows {first}..{min(expected, first + num) - 1} overlap the "
                        "previous shard")
      expected = max(expected, first + num)
    if expected != total:
      problems.append(f"rows {expected}..{total - 1} are in no shard (total_rows {total})"
                      if expected < total else
                      f"the shards hold rows up to {expected - 1} but total_rows is {total}")
  if n_rows is not None and totals and total != n_rows:
    problems.append(f"the image shards hold {total} rows but the labels file has {n_rows}")
  if problems:
    raise ShardError(f"image shard set of {len(files)} file(s) ({files[0]}, ...):\n  "
                     + "\n  ".join(problems))
  return ([f for *_, f in infos], np.array([first for first, *_ in infos], np.int64), total)


def check(location, n_rows: int) -> list[str]:
  """Problems with the shard set at `location` (glob, comma-separated or list) for `n_rows`."""
  files, problems = expand(location)
  if files:
    try:
      layout(files, n_rows, deep=True)
    except ShardError as e:
      problems += str(e).split("\n  ")[1:]
  return problems


class _OpenShard:
  """One shard open for reading: its offsets in memory and, when `bytes` is contiguous and
  unfiltered (as pack writes it), a plain file descriptor read with os.pread (no HDF5 call, no
  h5py lock, threads read in parallel); otherwise an h5py dataset, read without chunk cache."""

  def __init__(self, path: str):
    self.path, self.fd, self.data = path, None, None
    h5 = h5py.File(path, "r", locking=False, rdcc_nbytes=0)
    try:
      self.offsets = h5["offsets"][:]
      data = h5["bytes"]
      plist = data.id.get_create_plist()
      self.base = (data.id.get_offset() if plist.get_layout() == h5py.h5d.CONTIGUOUS
                   and plist.get_nfilters() == 0 else None)
      if self.base is None:
        self.data, h5 = data, None  # keeps the file open
      else:
        self.fd = os.open(path, os.O_RDONLY)
    finally:
      if h5 is not None:
        h5.close()

  def read(self, j: int) -> bytes:
    a, b = int(self.offsets[j]), int(self.offsets[j + 1])
    if self.fd is None:
      return self.data[a:b].tobytes()
    data = os.pread(self.fd, b - a, self.base + a)
    if len(data) != b - a:
      raise ShardError(f"{self.path}: row {j} ends past the end of the file (truncated?)")
    return data

  def __del__(self, _close=os.close):  # os may be gone at interpreter exit
    if self.fd is not None:
      _close(self.fd)
    elif self.data is not None and self.data.id.valid:
      self.data.file.close()


def _max_open() -> int:
  soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  return max(8, min(256, (soft if soft > 0 else 1024) // 4))


class ShardReader:
  """Raw row -> encoded bytes (`encoded`) or decoded RGB image (`image`) of a shard set.

  The layout is read and checked once, at construction. Picklable for Grain's worker processes:
  each process opens a shard on first use, keeping at most `max_open` open (least recently used
  closed first; by default a quarter of the open-file limit, at most 256).
  """

  def __init__(self, location, max_open: int = 0):
    files, problems = expand(location)
    if problems:
      raise ShardError("\n  ".join(["image shard set:"] + problems))
    self.files, self.starts, self.total = layout(files)
    self.max_open = max_open if max_open > 0 else _max_open()
    self._open, self._pid, self._lock = collections.OrderedDict(), None, threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_open"], state["_pid"], state["_lock"] = collections.OrderedDict(), None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.total

  def locate(self, row: int) -> tuple[int, int]:
    """(shard index into `files`, row inside it) of raw row `row`."""
    if not 0 <= row < self.total:
      raise IndexError(f"row {row} outside the image shards' 0..{self.total - 1}")
    s = int(np.searchsorted(self.starts, row, side="right")) - 1
    return s, row - int(self.starts[s])

  def _shard(self, s: int) -> "_OpenShard":
    """Shard s, opened in this process on first use."""
    with self._lock:
      if self._pid != os.getpid():  # a new process: never use handles of another
        self._open, self._pid = collections.OrderedDict(), os.getpid()
      shard = self._open.get(s)
      if shard is None:
        shard = self._open[s] = _OpenShard(self.files[s])
        while len(self._open) > self.max_open:
          self._open.popitem(last=False)  # closed when no thread reads from it any more
      else:
        self._open.move_to_end(s)
      return shard

  def encoded(self, row: int) -> bytes:
    s, off = self.locate(row)
    return self._shard(s).read(off)

  def image(self, row: int, size: int) -> np.ndarray:
    """The (size, size, 3) uint8 RGB image of raw row `row`, as decoding its file would give."""
    return preprocessing.to_rgb_uint8(self.encoded(row), size)

  def where(self, row: int) -> str:
    s, off = self.locate(row)
    return f"{self.files[s]} row {off}"
