"""Reads a `torch.save` checkpoint without torch and without running its pickle.

`load_torch_checkpoint` gives {torch name: numpy array} from a `torch.save` zip (a bare state dict
such as `pytorch_model.bin`, or a training `.pth` whose `model` / `state_dict` entry is one) or an
`.npz` keyed by torch names. The pickle is read by a restricted unpickler: only the tensor-rebuild
globals and a few builtins resolve; any other global (a config class, optimizer state, user
code) becomes an inert `Opaque` stand-in, so nothing in the file is imported or executed. Tensor
data is read from the archive's storages only when a tensor is materialised, and only after its
layout is checked against its storage and the storage's size against what the file can hold
(`_check_member`): a hostile file gets a `TorchFileError`, never a huge allocation.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import math
import os
import pickle
import zipfile

import numpy as np


class TorchFileError(ValueError):
  """A file this loader cannot read as a PyTorch checkpoint (checkpoint.CheckpointError is
  about our own, Orbax, checkpoints)."""


_NP_DTYPES = {"float32": "f4", "float64": "f8", "float16": "f2", "bfloat16": "u2", "int64": "i8",
              "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "?",
              "uint16": "u2", "uint32": "u4", "uint64": "u8"}
_STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64",
                   "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                   "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "UntypedStorage": "uint8"}
_SAFE_GLOBALS = {"collections.OrderedDict": collections.OrderedDict,
                 "builtins.set": set, "builtins.frozenset": frozenset, "builtins.list": list,
                 "builtins.dict": dict, "builtins.tuple": tuple, "builtins.int": int,
                 "builtins.float": float, "builtins.complex": complex, "builtins.bool": bool,
                 "builtins.str": str, "builtins.bytes": bytes, "builtins.bytearray": bytearray,
                 "_codecs.encode": codecs.encode, "torch.Size": tuple}


_DEFLATE_MAX_RATIO = 1032  # deflate expands at most ~1032x


def _check_member(info: zipfile.ZipInfo, file_bytes: int, what: str) -> None:
  """Refuses a zip member whose declared size the file cannot hold (before anything is read)."""
  if info.compress_size > file_bytes:
    raise TorchFileError(f"{what}: {info.compress_size} compressed bytes in a file of "
                          f"{file_bytes} bytes")
  if info.compress_type == zipfile.ZIP_STORED:
    limit = info.compress_size
  elif info.compress_type == zipfile.ZIP_DEFLATED:
    limit = _DEFLATE_MAX_RATIO * info.compress_size
  else:
    raise TorchFileError(f"{what}: zip compression method {info.compress_type} (only stored "
                          "and deflated members are read)")
  if info.file_size > limit:
    raise TorchFileError(f"{what}: declares {info.file_size} bytes, more than its "
                          f"{info.compress_size} bytes in the file can hold")


class Opaque:
  """Stands in for any global the loader does not trust: records what pickle hands it, runs
  nothing. `global_name` says what it replaced (e.g. `yacs.config.CfgNode`)."""
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list.append(value)

  def extend(self, values):
    self.list.extend(values)

  def __repr__(self):
    return f"<opaque {self.global_name}>"


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: str


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  name: str


class _Storage:
  """One raw storage of the archive, read on first use (optimizer state is never read)."""

  def __init__(self, archive, key: str, dtype: str, numel: int):
    self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel
    self._flat = None

  def flat(self) -> np.ndarray:
    if self._flat is None:
      self._flat = self.archive.read_storage(self.key, self.dtype, self.numel)
    return self._flat


@dataclasses.dataclass
class LazyTensor:
  """A tensor of the archive: a strided view of a storage, materialised by `numpy()`."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple
  dtype: str  # torch dtype name; bfloat16 is returned as float32

  def numpy(self) -> np.ndarray:
    """The values; TorchFileError when the layout reads outside the storage."""
    storage, dtype = self.storage, self.dtype
    if not isinstance(dtype, str) or dtype not in _NP_DTYPES:
      raise TorchFileError(f"unsupported tensor dtype {dtype!r:.100}")
    size, stride, offset = tuple(self.size), tuple(self.stride), self.offset
    layout = f"size {size}, stride {stride}, offset {offset}"
    if not all(isinstance(v, int) for v in (*size, *stride, offset)) or len(size) != len(stride):
      raise TorchFileError(f"storage {storage.key}: unsupported tensor layout: {layout}")
    if min((*size, *stride, offset)) < 0:
      raise TorchFileError(f"storage {storage.key}: negative tensor layout: {layout}")
    item = np.dtype(_NP_DTYPES[dtype]).itemsize
    nbytes = storage.numel * np.dtype(_NP_DTYPES[storage.dtype]).itemsize
    if nbytes % item:  # _rebuild_tensor_v3: a byte storage viewed as `dtype`
      raise TorchFileError(f"storage {storage.key}: {nbytes} bytes are not whole {dtype} "
                            "elements")
    numel, count = nbytes // item, math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if count else offset - 1
    if offset > numel or last >= numel:
      raise TorchFileError(f"storage {storage.key}: a tensor of {layout} reads past the "
                            f"storage's {numel} {dtype} elements")
    if count > numel and count * item > storage.archive.file_bytes:  # zero strides: expanded
      raise TorchFileError(f"storage {storage.key}: a tensor of {layout} expands "
                            f"{numel} elements into {count} ({count * item} bytes), more than "
                            f"the file's {storage.archive.file_bytes} bytes")
    flat = storage.flat()
    if dtype != storage.dtype:
      flat = flat.view(np.dtype(_NP_DTYPES[dtype]))
    if count == 0:
      out = np.zeros(size, flat.dtype)
    else:
      out = np.lib.stride_tricks.as_strided(flat[offset:], size,
                                            [s * flat.itemsize for s in stride]).copy()
    if dtype == "bfloat16":  # the upper half of a float32
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
  return _rebuild_tensor_v3(storage, offset, size, stride, None, None, None)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  if not isinstance(storage, _Storage):
    raise TorchFileError(f"a tensor rebuilt from {storage!r:.100}, not a storage")
  if dtype is None:  # v2: the storage's dtype
    name = storage.dtype
  else:
    name = dtype.name if isinstance(dtype, _TorchDtype) else getattr(dtype, "global_name", dtype)
  return LazyTensor(storage, offset, tuple(size), tuple(stride), name)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


_REBUILD = {"torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2}


class _Unpickler(pickle.Unpickler):
  """Resolves only the tensor-rebuild globals; every other global becomes an `Opaque` class."""

  def __init__(self, file, archive):
    super().__init__(file, encoding="utf-8")
    self.archive = archive

  def find_class(self, module, name):
    module = "builtins" if module == "__builtin__" else module  # protocol 2 names
    full = f"{module}.{name}"
    if full in _REBUILD:
      return _REBUILD[full]
    if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _NP_DTYPES:
      return _TorchDtype(name)
    if full in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[full]
    return type(name, (Opaque,), {"global_name": full})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise TorchFileError(f"unsupported persistent id in the pickle: {pid!r:.200}")
    _, storage_type, key, _, numel = pid
    if not isinstance(numel, int) or numel < 0:
      raise TorchFileError(f"storage {key}: {numel!r:.100} elements")
    return self.archive.storage(str(key), storage_type.dtype, numel)


class _Archive:
  """A `torch.save` zip: `<prefix>/data.pkl`, `<prefix>/data/<key>`, `<prefix>/byteorder`."""

  def __init__(self, zf: zipfile.ZipFile, prefix: str, file_bytes: int):
    self.zf, self.prefix, self.storages, self.file_bytes = zf, prefix, {}, file_bytes
    names = set(zf.namelist())
    order = f"{prefix}/byteorder"
    if order in names and zf.getinfo(order).file_size > 16:
      raise TorchFileError(f"{order}: {zf.getinfo(order).file_size} bytes, not a byte order")
    self.byteorder = zf.read(order).decode().strip() if order in names else "little"
    if self.byteorder not in ("little", "big"):
      raise TorchFileError(f"unknown byteorder {self.byteorder!r}")

  def storage(self, key: str, dtype: str, numel: int) -> _Storage:
    if key not in self.storages:
      self.storages[key] = _Storage(self, key, dtype, numel)
    old = self.storages[key]
    if (old.dtype, old.numel) != (dtype, numel):  # torch.save refuses to write this
      raise TorchFileError(f"storage {key} is declared as {old.numel} {old.dtype} and as "
                            f"{numel} {dtype} elements")
    return old

  def read_storage(self, key: str, dtype: str, numel: int) -> np.ndarray:
    """The storage's elements, read once its declared size is checked against the file."""
    name = f"{self.prefix}/data/{key}"
    try:
      info = self.zf.getinfo(name)
    except KeyError:
      raise TorchFileError(f"storage {key} is missing from the archive") from None
    dt = np.dtype(_NP_DTYPES[dtype]).newbyteorder("<" if self.byteorder == "little" else ">")
    if info.file_size != numel * dt.itemsize:
      raise TorchFileError(f"storage {key}: {numel} {dtype} elements ({numel * dt.itemsize} "
                            f"bytes) declared, {info.file_size} bytes in the archive")
    _check_member(info, self.file_bytes, f"storage {key}")
    raw = self.zf.read(name)
    if len(raw) != numel * dt.itemsize:
      raise TorchFileError(f"storage {key}: {len(raw)} bytes for {numel} {dtype} elements")
    return np.frombuffer(raw, dt).astype(dt.newbyteorder("="), copy=False)


WRAPPERS = ("model", "state_dict", "state_dict_ema")


def strip_prefixes(key: str) -> str:
  """`key` without the prefixes that wrappers add to every parameter name."""
  for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP, torch.compile
    while key.startswith(prefix):
      key = key[len(prefix):]
  return key


def _unwrap(obj, source: str) -> dict:
  """The state dict inside a loaded checkpoint: follows `model` / `state_dict` /
  `state_dict_ema` entries (the first present; timm's training checkpoints have the last)."""
  while isinstance(obj, dict):
    for key in WRAPPERS:
      if key in obj and not isinstance(obj[key], dict):
        raise TorchFileError(f"{source}: its {key!r} entry is {obj[key]!r:.100}, not a state "
                              "dict; save model.state_dict() instead")
    inner = next((obj[k] for k in WRAPPERS if k in obj), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, dict):
    raise TorchFileError(f"{source}: no state dict (a dict of tensors) found, got {obj!r:.100}")
  out, bad = {}, []
  for key, value in obj.items():
    if not isinstance(value, (LazyTensor, np.ndarray)):
      bad.append(f"{key} ({type(value).__name__})")
      continue
    name = strip_prefixes(str(key))
    if name in out:
      raise TorchFileError(f"{source}: key {name!r} appears twice once prefixes are stripped")
    try:
      out[name] = value.numpy() if isinstance(value, LazyTensor) else value
    except TorchFileError as e:
      raise TorchFileError(f"{source}: tensor {key}: {e}") from None
  if bad:
    raise TorchFileError(f"{source}: the state dict has non-tensor entries: {', '.join(bad)}")
  return out


def _check_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file_bytes: int, what: str) -> None:
  """Refuses an .npz member whose header declares more data than the member holds."""
  _check_member(info, file_bytes, what)
  fmt = np.lib.format
  with zf.open(info) as f:
    try:
      version = fmt.read_magic(f)
      read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
      shape, _, dtype = read_header(f)
    except ValueError as e:
      raise TorchFileError(f"{what}: not a .npy array: {e}") from None
    data = math.prod(shape) * dtype.itemsize
    if data > info.file_size - f.tell():
      raise TorchFileError(f"{what}: shape {shape} of {dtype} needs {data} bytes, the member "
                            f"holds {info.file_size - f.tell()}")


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """{torch name: array} from a `torch.save` zip (no torch needed, nothing executed) or an .npz.

  bfloat16 becomes float32 (exact); other dtypes are kept.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":
      raise TorchFileError(f"{path}: a legacy (torch < 1.6, non-zip) checkpoint; re-save it "
                            "with torch.save under torch >= 1.6")
    raise TorchFileError(f"{path}: neither a torch.save zip archive nor an .npz")
  file_bytes = os.path.getsize(path)
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pickles) == 1:
        _check_member(zf.getinfo(pickles[0]), file_bytes, f"{path}: {pickles[0]}")
        with zf.open(pickles[0]) as f:
          try:
            obj = _Unpickler(f, _Archive(zf, pickles[0].split("/")[0], file_bytes)).load()
          except TorchFileError as e:
            raise TorchFileError(f"{path}: {e}") from None
          except Exception as e:  # malformed pickles raise about anything
            raise TorchFileError(f"{path}: cannot unpickle data.pkl: {e!r}") from e
        return _unwrap(obj, path)
      if any(n.endswith("constants.pkl") for n in names):
        raise TorchFileError(f"{path}: a TorchScript archive; save model.state_dict() instead")
      if names and all(n.endswith(".npy") for n in names):
        for info in zf.infolist():
          _check_npy(zf, info, file_bytes, f"{path}: {info.filename}")
        with np.load(path, allow_pickle=False) as f:
          return _unwrap({k: f[k] for k in f.files}, path)
  except (zipfile.BadZipFile, EOFError) as e:  # EOFError: a member cut short
    raise TorchFileError(f"{path}: a damaged zip archive: {e}") from e
  raise TorchFileError(f"{path}: a zip without <prefix>/data.pkl (torch.save) or .npy members")
