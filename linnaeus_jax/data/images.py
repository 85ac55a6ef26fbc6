"""Where images come from: a folder of files, `images.h5` of decoded arrays, or a set of shard
files of encoded images (data/shards.py: a glob or comma-separated paths); reading, checks and
verification.

Missing-image policy (`data.hybrid.missing_image_policy`): `error` fails naming the files (at
start-up when verification runs, else when the image is read); `skip` verifies every file up
front and excludes the missing rows, within `verify_images.max_missing_count/ratio`, listing them
in `assets/missing_images.json`, and an image found unreadable later (corrupt, when
`verify_images.decode` is off) is skipped when read: the reader returns None and the pipeline
masks that slot; `placeholder` trains on a zero image and counts it.

Identifiers name files inside the folder: absolute ones and ones climbing out with `..` are
refused (`outside_folder`, checked by labels.load at start-up; `file_path` raises).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import h5py
import numpy as np

from linnaeus_jax import preprocessing
from linnaeus_jax.data import shards


def is_h5(location: str) -> bool:
  """Whether `location` names HDF5 file(s) rather than a folder: `images.h5`, a shard glob or
  comma-separated shard paths."""
  parts = [p.strip() for p in location.split(",") if p.strip()]
  return bool(parts) and all(p.endswith((".h5", ".hdf5")) for p in parts)


def kind(location: str) -> str:
  """'folder', 'h5' (one images.h5 of decoded arrays) or 'shards' (encoded images: a glob,
  several paths, or one file written by shards.pack)."""
  if not is_h5(location):
    return "folder"
  if shards.is_set(location) or shards.is_shard_file(location):
    return "shards"
  return "h5"


def to_str(image_id) -> str:
  return image_id.decode("utf-8") if isinstance(image_id, bytes) else str(image_id)


def _escapes(name: str) -> bool:
  """Whether `folder/name` lies outside `folder`: `name` is absolute or climbs out with `..`."""
  return os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == ".."


def outside_folder(image_ids) -> np.ndarray:
  """(N,) bool: the identifiers that name a file outside their folder (absolute, or `..`).

  Vectorised pre-selection (a leading separator or a `..` anywhere), exact check on those only.
  """
  ids = np.asarray(image_ids)
  if ids.dtype.kind not in "SU":
    ids = np.array([to_str(x) for x in ids], dtype=str)
  sep, dots = ((os.sep.encode(), b"..") if ids.dtype.kind == "S" else (os.sep, ".."))
  maybe = np.char.startswith(ids, sep) | (np.char.find(ids, dots) >= 0)
  out = np.zeros(len(ids), bool)
  for i in np.flatnonzero(maybe):
    out[i] = _escapes(to_str(ids[i]))
  return out


def file_path(folder: str, image_id, extension: str) -> str:
  """`folder/image_id`, with `extension` appended only when the id lacks it (case-insensitive).

  Raises ValueError for an identifier that resolves outside `folder`.
  """
  name = to_str(image_id)
  if _escapes(name):
    raise ValueError(f"image identifier {name!r} resolves outside the images folder {folder}")
  if extension and not name.lower().endswith(extension.lower()):
    name += extension
  return os.path.join(folder, name)


def check_h5(path: str, n_rows: int) -> list[str]:
  """Problems with an images.h5 file meant to hold `n_rows` uint8 HWC RGB images, or with a shard
  set (`kind` 'shards') meant to hold `n_rows` rows: all of them, each naming its file."""
  if kind(path) == "shards":
    return shards.check(path, n_rows)
  try:
    with h5py.File(path, "r", locking=False) as h5:
      if "images" not in h5:
        hint = (" (an image shard needs the attributes shards.pack writes: first_row, num_rows, "
                "total_rows, encoding='encoded')" if "bytes" in h5 else "")
        return [f"{path}: missing dataset 'images'{hint}"]
      ds = h5["images"]
      problems = []
      if ds.ndim != 4 or ds.shape[-1] != 3:
        problems.append(f"{path}: images has shape {ds.shape}, expected (N, H, W, 3)")
      if ds.dtype != np.uint8:
        problems.append(f"{path}: images has dtype {ds.dtype}, expected uint8")
      if ds.shape[0] != n_rows:
        problems.append(f"{path}: images has {ds.shape[0]} rows but the labels file has {n_rows}")
      return problems
  except OSError as e:
    return [f"cannot open images file {path}: {e}"]


class MissingImagesError(FileNotFoundError):
  pass


def verify(folder: str, image_ids, extension: str, opts, policy: str, split: str) -> np.ndarray:
  """Checks that every file exists (and decodes, with `opts.decode`); returns the missing mask.

  Raises MissingImagesError naming the files under policy `error`, or when the missing count or
  ratio exceeds `opts.max_missing_count` (< 0: unlimited) / `opts.max_missing_ratio`.
  """
  def bad(i):
    path = file_path(folder, image_ids[i], extension)
    if not os.path.exists(path):
      return True
    if opts.decode:
      try:
        preprocessing.to_rgb_uint8(path, 8)
      except Exception:  # pylint: disable=broad-except  (any undecodable file)
        return True
    return False
  n = len(image_ids)
  workers = opts.num_workers if opts.num_workers > 0 else (os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    missing = np.fromiter(pool.map(bad, range(n), chunksize=4096), bool, n)
  count = int(missing.sum())
  if count:
    names = [to_str(image_ids[i]) for i in np.flatnonzero(missing)[:10]]
    listing = ", ".join(names) + (f", ... ({count} in all)" if count > 10 else "")
    over = ((opts.max_missing_count >= 0 and count > opts.max_missing_count)
            or count / max(n, 1) > opts.max_missing_ratio)
    if policy == "error" or over:
      why = ("data.hybrid.missing_image_policy is 'error'" if policy == "error" else
             f"more than verify_images.max_missing_count={opts.max_missing_count} / "
             f"max_missing_ratio={opts.max_missing_ratio}")
      raise MissingImagesError(f"{count} of {n} {split} images missing or unreadable in "
                               f"{folder} ({why}): {listing}")
    logging.warning("%d of %d %s images missing (%s): %s", count, n, split, policy, listing)
  return missing


_UNREADABLE: dict[str, str] = {}  # path -> reason: the unreadable images this process met


def _note_unreadable(path: str, error: Exception, action: str) -> None:
  """Warns about an unreadable image the first time this process meets it; later reads of it
  (every epoch) are silent. The closing summary of a run counts them (`unreadable_images`)."""
  if path in _UNREADABLE:
    return
  _UNREADABLE[path] = str(error)
  logging.warning("image %s unreadable (%s); %s. Warned once; counted at the end of the run.",
                  path, error, action)


def reset_unreadable() -> None:
  """Forgets the unreadable images met so far (a new run in the same process)."""
  _UNREADABLE.clear()


def unreadable_images() -> dict[str, str]:
  """{path: reason} of the unreadable images this process has met (worker processes keep
  their own)."""
  return dict(_UNREADABLE)


class ImageReader:
  """Reads one image by (raw row, identifier) from a folder, an `images.h5` file or a shard set.

  An unreadable file (or undecodable shard row): policy `placeholder` gives a zero image, `skip`
  None (the pipeline masks the slot), `error` raises MissingImagesError; each with a warning
  naming it. Picklable for Grain's worker processes: HDF5 files are opened lazily per process
  (a shard set's layout is read and checked here, at construction).
  """

  def __init__(self, location: str, img_size: int, file_extension: str = ".jpg",
               policy: str = "error"):
    self.location, self.img_size = location, img_size
    self.ext, self.policy = file_extension, policy
    self.kind = kind(location)
    self.h5 = self.kind == "h5"
    self.shards = shards.ShardReader(location) if self.kind == "shards" else None
    self._handle, self._pid = None, None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_handle"], state["_pid"] = None, None  # h5py handles cannot be pickled or forked
    return state

  def __call__(self, raw_row: int, image_id) -> np.ndarray | None:
    if self.h5:
      if self._handle is None or self._pid != os.getpid():
        self._handle = h5py.File(self.location, "r", locking=False)["images"]
        self._pid = os.getpid()
      return preprocessing.to_rgb_uint8(self._handle[raw_row], self.img_size)
    if self.shards is not None:
      data = self.shards.encoded(raw_row)  # I/O errors raise: a damaged set, not one image
    else:
      data = file_path(self.location, image_id, self.ext)
    try:
      return preprocessing.to_rgb_uint8(data, self.img_size)
    except Exception as e:  # pylint: disable=broad-except  (missing or undecodable)
      path = self.shards.where(raw_row) if self.shards is not None else data
      if self.policy in ("placeholder", "skip"):
        _note_unreadable(str(path), e, "using a zero image" if self.policy == "placeholder"
                         else "skipped (missing_image_policy skip)")
        return (np.zeros((self.img_size, self.img_size, 3), np.uint8)
                if self.policy == "placeholder" else None)
      raise MissingImagesError(
          f"image {path!r} (row {raw_row}) cannot be read: {e}. Set "
          "data.hybrid.missing_image_policy to 'skip' (verify and exclude up front, skip what "
          "fails later) or 'placeholder' (train on a zero image).") from e
