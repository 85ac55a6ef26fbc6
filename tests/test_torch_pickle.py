"""linnaeus_jax.tools.torch_pickle: torch.save files read without torch, nothing executed.

`tests/data/torch_checkpoint.pth` was written once by PyTorch 2.13 (CPU, in a separate venv; torch
is not a dependency of linnaeus_jax) from the repository root with:

    import collections
    import torch
    from yacs.config import CfgNode


    class Note:  # a custom class: the loader must neither import nor run it
      def __init__(self):
        self.text = "not a tensor"


    sd = collections.OrderedDict()
    sd["module.a.weight"] = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
    sd["module.t.weight"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # (1, 4)
    sd["module.s.bias"] = torch.arange(10, dtype=torch.float32)[2:9:3]  # offset 2, stride 3
    sd["module.b.weight"] = torch.tensor([[1.0, -2.5], [3.140625, 2.0 ** -7]],
                                         dtype=torch.bfloat16)
    sd["module.h.weight"] = torch.tensor([0.5, -65504.0], dtype=torch.float16)
    sd["module.p.gamma"] = torch.nn.Parameter(torch.tensor([1.5, -0.25]))
    sd["module.n.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    sd["module.m.mask"] = torch.tensor([True, False, True])
    torch.save({"model": sd, "epoch": 3, "note": Note(),
                "config": CfgNode({"MODEL": CfgNode({"NAME": "mFormerV1_sm", "DEPTHS": [3, 3]})}),
                "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}},
                              "param_groups": [{"lr": 0.1}]}},
               "tests/data/torch_checkpoint.pth")
"""

import io
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest

from linnaeus_jax import cli
from linnaeus_jax import config as config_lib
from linnaeus_jax.tools import convert_torch
from linnaeus_jax.tools import torch_pickle

from conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "data", "torch_checkpoint.pth")


def test_loader_reads_a_real_torch_file_without_torch(tmp_path):
  assert "torch" not in sys.modules
  sd = torch_pickle.load_torch_checkpoint(FIXTURE)
  assert "torch" not in sys.modules
  assert list(sd) == ["a.weight", "t.weight", "s.bias", "b.weight", "h.weight", "p.gamma",
                      "n.num_batches_tracked", "m.mask"]  # `model` unwrapped, `module.` gone
  np.testing.assert_array_equal(sd["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
  np.testing.assert_array_equal(sd["t.weight"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
  np.testing.assert_array_equal(sd["s.bias"], np.array([2.0, 5.0, 8.0], np.float32))
  assert sd["b.weight"].dtype == np.float32  # bfloat16 -> float32, exactly
  np.testing.assert_array_equal(sd["b.weight"], np.array([[1.0, -2.5], [3.140625, 2.0 ** -7]]))
  assert sd["h.weight"].dtype == np.float16
  np.testing.assert_array_equal(sd["h.weight"], np.array([0.5, -65504.0], np.float16))
  np.testing.assert_array_equal(sd["p.gamma"], np.array([1.5, -0.25], np.float32))
  assert sd["n.num_batches_tracked"].dtype == np.int64 and sd["n.num_batches_tracked"] == 7
  np.testing.assert_array_equal(sd["m.mask"], np.array([True, False, True]))

  npz = str(tmp_path / "sd.npz")
  np.savez(npz, **{"module.x.weight": np.ones((2, 2), np.float32)})
  assert list(torch_pickle.load_torch_checkpoint(npz)) == ["x.weight"]
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"\x80\x02not a zip")
  with pytest.raises(torch_pickle.TorchFileError, match="legacy"):
    torch_pickle.load_torch_checkpoint(str(bad))


class _Evil:
  """Pickles as a call of os.system, which the reader must not make."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_unknown_globals_stay_inert(tmp_path):
  marker, path = tmp_path / "ran", tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"model": _Evil(marker)}, protocol=2))
  with pytest.raises(torch_pickle.TorchFileError, match="'model' entry is <opaque"):
    torch_pickle.load_torch_checkpoint(str(path))
  assert not marker.exists()


def _val(x) -> bytes:
  """The pickle opcodes that push `x` (no PROTO, no STOP)."""
  return pickle.dumps(x, protocol=2)[2:-1]


def _global(module, name) -> bytes:
  return f"c{module}\n{name}\n".encode()


def _write_torch_zip(path, tensors, storages, compression=zipfile.ZIP_STORED):
  """A torch.save-style zip written by hand: `tensors` {name: dict(key, numel, offset, size,
  stride[, storage])} as float32 `_rebuild_tensor_v2` calls (`storage`: opcodes pushing some
  other first argument, then `_rebuild_tensor_v3`), `storages` {key: bytes}."""
  pkl = b"\x80\x02}"  # PROTO 2, EMPTY_DICT
  for name, t in tensors.items():
    pid = (b"(" + _val("storage") + _global("torch", "FloatStorage") + _val(t["key"])
           + _val("cpu") + _val(t["numel"]) + b"tQ")  # MARK ... TUPLE, BINPERSID
    rebuild = "_rebuild_tensor_v2"
    if "storage" in t:
      pid, rebuild = t["storage"], "_rebuild_tensor_v3"
    args = (b"(" + pid + _val(t["offset"]) + _val(t["size"]) + _val(t["stride"]) + _val(False)
            + _val({}) + (_global("torch", "float32") if "storage" in t else b"") + b"t")
    pkl += _val(name) + _global("torch._utils", rebuild) + args + b"Rs"  # REDUCE, SETITEM
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pkl + b".")
    zf.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      zf.writestr(f"archive/data/{key}", data, compress_type=compression)


_FLOATS = np.arange(8, dtype="<f4").tobytes()


def _one(size, stride, offset=0, numel=8, **extra):
  return {"w": dict(key="0", numel=numel, offset=offset, size=size, stride=stride, **extra)}


def test_hand_written_archives_read_like_torch_files(tmp_path):
  path = tmp_path / "ok.pth"
  _write_torch_zip(path, _one((2, 3), (1, 2), offset=1), {"0": _FLOATS})
  sd = torch_pickle.load_torch_checkpoint(str(path))
  np.testing.assert_array_equal(sd["w"], np.arange(1, 7, dtype=np.float32).reshape(3, 2).T)
  _write_torch_zip(path, _one((3,), (0,), offset=7), {"0": _FLOATS})  # an expanded view
  np.testing.assert_array_equal(torch_pickle.load_torch_checkpoint(str(path))["w"], [7.0] * 3)


def _npy(shape, data: bytes) -> bytes:
  f = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      f, {"descr": "<f4", "fortran_order": False, "shape": shape})
  return f.getvalue() + data


# (id, tensors, storages, zip compression, the error): tensors whose layout or storage does not
# fit the file; each is refused before any storage is read.
HOSTILE = [
    ("past_the_end", _one((4, 4), (4, 1)), {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"tensor w: storage 0: a tensor of size \(4, 4\), stride \(4, 1\), offset 0 reads past "
     r"the storage's 8 float32 elements"),
    ("negative_stride", _one((2,), (-1,), offset=1), {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"tensor w: storage 0: negative tensor layout: size \(2,\), stride \(-1,\), offset 1"),
    ("negative_offset", _one((2,), (1,), offset=-1), {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"tensor w: storage 0: negative tensor layout: .* offset -1"),
    ("offset_past_the_end", _one((2,), (1,), offset=9), {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"tensor w: storage 0: a tensor of size \(2,\), stride \(1,\), offset 9 reads past"),
    ("empty_offset_past_the_end", _one((0,), (1,), offset=100), {"0": _FLOATS},
     zipfile.ZIP_STORED, r"tensor w: storage 0: .* offset 100 reads past the storage's 8"),
    ("non_integer_size", _one((2.5,), (1,)), {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"tensor w: storage 0: unsupported tensor layout: size \(2.5,\)"),
    ("expanded_past_the_file", _one((1000, 1000), (0, 0)), {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"tensor w: storage 0: .* expands 8 elements into 1000000 \(4000000 bytes\), more than "
     r"the file's \d+ bytes"),
    ("storage_of_10**12_elements", _one((2,), (1,), numel=10**12), {"0": _FLOATS},
     zipfile.ZIP_STORED, r"tensor w: storage 0: 1000000000000 float32 elements "
     r"\(4000000000000 bytes\) declared, 32 bytes in the archive"),
    ("storage_declared_twice", {**_one((2,), (1,)), "v": dict(key="0", numel=16, offset=0,
                                                            size=(2,), stride=(1,))},
     {"0": _FLOATS}, zipfile.ZIP_STORED,
     r"storage 0 is declared as 8 float32 and as 16 float32 elements"),
    ("not_a_storage", _one((2,), (1,), storage=_val(7)), {}, zipfile.ZIP_STORED,
     r"a tensor rebuilt from 7, not a storage"),
    ("bzip2_storage", _one((2,), (1,)), {"0": _FLOATS}, zipfile.ZIP_BZIP2,
     r"storage 0: zip compression method 12 \(only stored and deflated members are read\)"),
    ("npz_header_of_10**12_elements", None, {"x.npy": _npy((10**6, 10**6), _FLOATS)},
     zipfile.ZIP_STORED, r"x.npy: shape \(1000000, 1000000\) of float32 needs 4000000000000 "
     r"bytes, the member holds 32"),
]


def _write_hostile(path, tensors, storages, compression):
  if tensors is None:  # an .npz
    with zipfile.ZipFile(path, "w") as zf:
      for name, data in storages.items():
        zf.writestr(name, data, compress_type=compression)
  else:
    _write_torch_zip(path, tensors, storages, compression)


@pytest.mark.parametrize("tensors,storages,compression,error",
                         [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_layouts_and_sizes_are_refused_before_reading(tmp_path, monkeypatch, tensors,
                                                              storages, compression, error):
  path = tmp_path / "hostile.pth"
  _write_hostile(path, tensors, storages, compression)
  read = zipfile.ZipFile.read

  def guarded_read(self, name, *args):
    assert "/data/" not in str(name), f"storage {name} read"
    return read(self, name, *args)
  monkeypatch.setattr(zipfile.ZipFile, "read", guarded_read)
  monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called"))
  with pytest.raises(torch_pickle.TorchFileError, match=error) as e:
    torch_pickle.load_torch_checkpoint(str(path))
  assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_the_cli_reports_a_hostile_checkpoint_on_one_line(tmp_path, capsys):
  path = tmp_path / "hostile.pth"
  _write_torch_zip(path, _one((4, 4), (4, 1)), {"0": _FLOATS})
  with pytest.raises(SystemExit) as e:
    cli.call(convert_torch.run, str(path), config_lib.base_config(), str(tmp_path / "out"))
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "tensor w: storage 0" in err
  assert not os.path.exists(tmp_path / "out")
