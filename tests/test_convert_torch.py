"""linnaeus_jax.tools.convert_torch: strict mapping, CLI, parity (the reader: test_torch_pickle).

The parity test runs only when LINNAEUS_TORCH_REFERENCE names a folder with `pytorch_model.bin`
and `reference.npz` made by `tests/make_torch_reference.py` from a checkout of the original (sm,
224 px, heads 17/9/5/3, metadata TEMPORAL 4, SPATIAL 3, ELEVATION 10).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from linnaeus_jax import config as config_lib
from linnaeus_jax import models
from linnaeus_jax.inference import bundle
from linnaeus_jax.tools import convert_torch as ct
from linnaeus_jax.tools import torch_pickle

from conftest import ROOT, tiny_config

CLASSES = (5, 4, 3, 2)


def _tiny(scan=True, num_classes=CLASSES):
  c = tiny_config("/unused")
  c.model.scan_blocks = scan
  for t, n in zip(c.data.task_keys_h5, num_classes):
    c.model.classification.heads[t].num_classes = n
  return c


def _random_model(config, seed=0):
  """(converted-style config, graphdef, random params as numpy, buffers) of a tiny model."""
  config, _ = ct.compat_config(config)
  graphdef, params, buffers = models.abstract(config)
  assert not jax.tree.leaves(nnx.to_pure_dict(buffers))  # Linear heads: no buffers
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                        nnx.to_pure_dict(params))
  return config, graphdef, params, {}


@jax.jit(static_argnums=0)
def _forward(graphdef, params, buffers, image, meta, valid):
  return nnx.merge(graphdef, params, buffers)(image, meta, valid)


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  meta = {n: rng.normal(size=(2, d)).astype(np.float32)
          for n, d in (("TEMPORAL", 2), ("SPATIAL", 3), ("ELEVATION", 10))}
  return image, meta, np.array([[True, False, True], [False, True, True]])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("scan,torch_heads", [
    (True, ("Linear",) * 4),
    (False, ("ConditionalClassifier", "HierarchicalSoftmax", "ConditionalClassifier", "Linear"))])
def test_round_trip_gives_the_same_params_and_logits(scan, torch_heads):
  cfg, graphdef, params, buffers = _random_model(_tiny(scan))
  torch_cfg = config_lib.with_defaults(cfg)
  for t, kind in zip(cfg.data.task_keys_h5, torch_heads):
    torch_cfg.model.classification.heads[t].type = kind
  sd = ct.to_torch({"params": params}, torch_cfg)
  assert sd["stem.0.weight"].shape == (16, 3, 4, 4)
  assert sd["stages.0.0.dwconv.weight"].shape == (16, 1, 7, 7)
  assert sd["stages.2.0.attn.qkv.weight"].shape == (96, 32)
  assert sd["stages.3.0.attn.freqs"].shape == (2, 2, 12)
  assert sd["aggregate.weight"].shape == (1, 2, 1) and sd["aggregate.bias"].shape == (1,)
  assert sd["meta_elevation_head_2.0.weight"].shape == (48, 10)
  sd = {"module." + k: v for k, v in sd.items()}

  source = _tiny(scan, num_classes=(0, 0, 0, 0))  # taken from the checkpoint
  source.model.classification.heads.taxa_L10.type = "ConditionalClassifier"
  variables, out_cfg, report = ct.convert_with_report(sd, source)
  _assert_trees_equal(variables["params"], params)
  _assert_trees_equal(variables["buffers"], buffers)
  m = out_cfg.model
  assert (m.rope_mode, m.meta_missing, m.attn_scale) == ("cos_only", "zeros", "rsqrt_head_dim")
  assert [m.classification.heads[t].num_classes for t in out_cfg.data.task_keys_h5] == [5, 4, 3, 2]
  assert all(m.classification.heads[t].type == "Linear" for t in out_cfg.data.task_keys_h5)
  assert report["torch_head_types"] == dict(zip(cfg.data.task_keys_h5, torch_heads))
  assert report["counts"]["torch_tensors"] == len(sd)
  n_hier = sum(h != "Linear" for h in torch_heads)
  assert len(report["ignored"]["buffers"]) == 3 * n_hier  # hmatrix per adjacent pair and head
  assert len(report["ignored"]["dead"]) == 2 * n_hier  # the Linear task's shared copies
  assert ct.compat_config(source, flash_attn_trained=True)[0].model.attn_scale == "inv_head_dim"

  image, meta, valid = _inputs()
  want = _forward(graphdef, params, buffers, image, meta, valid)
  out_graphdef, _, _ = models.abstract(out_cfg)
  got = _forward(out_graphdef, variables["params"], variables["buffers"], image, meta, valid)
  for t in want:
    np.testing.assert_array_equal(np.asarray(got[t]), np.asarray(want[t]))

  if n_hier:  # the shared level classifiers must be identical wherever they appear
    sd["module.head.taxa_L20.task_classifiers.taxa_L10.bias"] = sd[
        "module.head.taxa_L20.task_classifiers.taxa_L10.bias"] + 1
    with pytest.raises(ct.ConversionError, match="task_classifiers.taxa_L10.bias differs"):
      ct.convert(sd, source)


def test_strict_error_lists_every_problem():
  cfg, _, params, _ = _random_model(_tiny())
  sd = ct.to_torch({"params": params}, cfg)
  del sd["stages.2.0.attn.proj.bias"]
  sd["stages.9.0.extra.weight"] = np.zeros((3, 3), np.float32)
  sd["norm_2.weight"] = np.zeros((47,), np.float32)
  with pytest.raises(ct.ConversionError) as e:
    ct.convert(sd, _tiny())
  msg = str(e.value)
  assert "stages.2.0.attn.proj.bias (expected shape (32,))" in msg
  assert "stages.9.0.extra.weight (shape (3, 3))" in msg
  assert "norm_2.weight: checkpoint (47,), expected (48,)" in msg
  assert [k for k, _ in e.value.missing] == ["stages.2.0.attn.proj.bias"]
  assert [k for k, _ in e.value.unexpected] == ["stages.9.0.extra.weight"]
  assert e.value.mismatched == [("norm_2.weight", (47,), (48,))]


def test_config_mismatches_are_listed_together():
  cfg, _, params, _ = _random_model(_tiny())
  sd = ct.to_torch({"params": params}, cfg)
  other = _tiny(num_classes=(5, 4, 3, 7))  # taxa_L40 disagrees
  other.data.meta.components.TEMPORAL.dim = 4  # the checkpoint's take 2
  other.data.meta.components.ELEVATION.enabled = False  # the checkpoint has it
  with pytest.raises(ct.ConversionError) as e:
    ct.convert(sd, other)
  msg = "\n".join(e.value.other)
  assert "taxa_L40.num_classes is 7 but the checkpoint's head has 2" in msg
  assert "TEMPORAL.dim is 4 but the checkpoint's meta_temporal_head_* take 2" in msg
  assert "metadata component 'elevation'" in msg
  assert "head.taxa_L40.fc.weight: checkpoint (2, 48), expected (7, 48)" in str(e.value)
  assert any(k.startswith("meta_elevation_head_1.") for k, _ in e.value.unexpected)
  missing_meta = _tiny()
  missing_meta.data.meta.components.ELEVATION.enabled = True
  del_keys = [k for k in sd if k.startswith("meta_elevation_")]
  with pytest.raises(ct.ConversionError, match="ELEVATION .dim 10. is enabled but"):
    ct.convert({k: v for k, v in sd.items() if k not in del_keys}, missing_meta)


def test_run_writes_the_folder_only_when_complete(tmp_path):
  cfg, _, params, _ = _random_model(_tiny())
  npz = str(tmp_path / "sd.npz")
  np.savez(npz, **ct.to_torch({"params": params}, cfg))
  config_json = tmp_path / "config.json"
  config_json.write_text(config_lib.to_json(_tiny(num_classes=(0, 0, 0, 0))))
  out = tmp_path / "converted"
  record = ct.run(npz, str(config_json), str(out), overrides=["data.img_size=64"])
  assert sorted(os.listdir(out)) == ["config.json", "conversion.json", "params.npz"]
  _assert_trees_equal(bundle.load_params(str(out / "params.npz"))["params"], params)
  written = json.loads((out / "conversion.json").read_text())
  assert written["sha256"] == ct.sha256(npz) and written == json.loads(json.dumps(record))
  assert {s["key"] for s in written["switches"]} >= {"model.rope_mode", "model.meta_missing",
                                                     "model.attn_scale"}
  converted = ct.load_config(str(out / "config.json"))
  assert converted.model.rope_mode == "cos_only" and converted.data.img_size == 64
  assert converted.model.classification.heads.taxa_L30.num_classes == 3
  with pytest.raises(FileExistsError):
    ct.run(npz, str(config_json), str(out))
  with pytest.raises(ct.ConversionError):
    ct.run(npz, "configs/sm.py", str(tmp_path / "failed"))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "converted", "sd.npz"]


@pytest.mark.slow
def test_cli_reports_bad_input_and_exits_1(tmp_path):
  cfg, _, params, _ = _random_model(_tiny())
  npz = str(tmp_path / "sd.npz")
  np.savez(npz, **ct.to_torch({"params": params}, cfg))
  base = [sys.executable, "-m", "linnaeus_jax.tools.convert_torch", f"--out={tmp_path}/out"]
  r = subprocess.run(base + [f"--checkpoint={tmp_path}/nope.pth", "--config=configs/sm.py"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "error: no such checkpoint file" in r.stderr, r.stderr
  r = subprocess.run(base + [f"--checkpoint={npz}", "--config=configs/sm.py"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr
  assert "error: the checkpoint does not match" in r.stderr
  assert "stem.0.weight: checkpoint (16, 3, 4, 4), expected (96, 3, 4, 4)" in r.stderr
  r = subprocess.run(base + [f"--checkpoint={npz}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1 and "give exactly one of --config and --yaml_config" in r.stderr
  assert not os.path.exists(tmp_path / "out")


TINY_YAML = """
MODEL:
  TYPE: mFormerV1
  CONVNEXT_STAGES: {DEPTHS: [1, 1], DIMS: [16, 24, 32, 48]}
  ROPE_STAGES: {DEPTHS: [1, 1], DIMS: [32, 48], NUM_HEADS: [2, 2]}
DATA:
  META: {COMPONENTS: {ELEVATION: {ENABLED: True}}}
"""


@pytest.mark.slow
def test_cli_takes_a_config_file_with_overrides_or_the_originals_yaml(tmp_path):
  cfg, _, params, _ = _random_model(_tiny())
  npz = str(tmp_path / "sd.npz")
  np.savez(npz, **ct.to_torch({"params": params}, cfg))
  (tmp_path / "tiny.json").write_text(config_lib.to_json(_tiny(num_classes=(0, 0, 0, 0))))
  (tmp_path / "tiny.py").write_text(
      "from linnaeus_jax import config as config_lib\n\n\ndef get_config():\n"
      f"  return config_lib.from_json(open({str(tmp_path / 'tiny.json')!r}).read())\n")
  (tmp_path / "tiny.yaml").write_text(TINY_YAML)
  base = [sys.executable, "-m", "linnaeus_jax.tools.convert_torch", f"--checkpoint={npz}"]
  for name, args in (("py", [f"--config={tmp_path / 'tiny.py'}", "--config.data.img_size=64"]),
                     ("yaml", [f"--yaml_config={tmp_path / 'tiny.yaml'}"])):
    out = tmp_path / name
    r = subprocess.run(base + args + [f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    _assert_trees_equal(bundle.load_params(str(out / "params.npz"))["params"], params)
    record = json.loads((out / "conversion.json").read_text())
    converted = ct.load_config(str(out / "config.json"))
    if name == "py":
      assert record["config_source"] == str(tmp_path / "tiny.py")
      assert record["overrides"] == ["data.img_size=64"] and converted.data.img_size == 64
    else:
      assert record["config_source"] == str(tmp_path / "tiny.yaml") and not record["overrides"]


@pytest.mark.skipif(not os.environ.get("LINNAEUS_TORCH_REFERENCE"),
                    reason="set LINNAEUS_TORCH_REFERENCE to a make_reference.py output folder")
def test_parity_with_the_original():
  ref_dir = os.environ["LINNAEUS_TORCH_REFERENCE"]
  ref = np.load(os.path.join(ref_dir, "reference.npz"))
  config = ct.load_config(os.path.join(ROOT, "configs", "sm.py"))
  config.data.img_size = int(ref["img_size"])
  names = [str(n) for n in ref["meta_components"]]
  for name, dim in zip(names, ref["meta_dims"]):
    config.data.meta.components[name].enabled = True
    config.data.meta.components[name].dim = int(dim)
  config.model.dtype = "float32"
  for t in config.data.task_keys_h5:
    config.model.classification.heads[t].num_classes = 0
  sd = torch_pickle.load_torch_checkpoint(os.path.join(ref_dir, "pytorch_model.bin"))
  variables, config = ct.convert(sd, config)
  assert [config.model.classification.heads[t].num_classes
          for t in config.data.task_keys_h5] == [17, 9, 5, 3]
  graphdef, _, _ = models.abstract(config)

  @jax.jit
  def forward(variables, image, meta, valid):
    model = nnx.merge(graphdef, variables["params"], variables["buffers"])
    return model(image, meta, valid), model.features(image, meta, valid)
  image = ref["images_nhwc"]  # N(0, 1) NHWC floats, fed as is (no preprocessing.normalize)
  meta = {n: ref[f"meta_{n}"] for n in names}
  ones = np.ones((image.shape[0], len(names)), bool)
  logits, feats = forward(variables, image, meta, ones)
  logits_missing, _ = forward(variables, image, meta, ~ones)  # all invalid = zeros (original)
  diffs = {"features": float(np.abs(np.asarray(feats) - ref["features"]).max())}
  for t in config.data.task_keys_h5:
    diffs[t] = float(np.abs(np.asarray(logits[t]) - ref[f"logits_{t}"]).max())
    diffs[f"metazero/{t}"] = float(np.abs(np.asarray(logits_missing[t]) -
                                          ref[f"logits_metazero_{t}"]).max())
  print("max |ours - original|:", json.dumps(diffs, indent=1))
  assert max(diffs.values()) < 1e-4, diffs
