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

import os
import pickle
import sys
import zipfile

import numpy as np
import pytest

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
  with pytest.raises(torch_pickle.CheckpointError, match="legacy"):
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
  with pytest.raises(torch_pickle.CheckpointError, match="'model' entry is <opaque"):
    torch_pickle.load_torch_checkpoint(str(path))
  assert not marker.exists()
