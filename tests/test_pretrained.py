"""linnaeus_jax.pretrained: ImageNet ConvNeXt / RoPE-ViT stitching and fine-tuning sources.

The fixtures in tests/data/pretrained were made by tests/make_pretrained_fixtures.py from the
official ConvNeXt and RoPE-ViT code and from timm (reduced widths, perturbed weights); shapes/
holds the full-size models' key and shape lists.
"""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from linnaeus_jax import config as config_lib
from linnaeus_jax import models, pretrained, train
from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax.data import synthetic
from linnaeus_jax.inference import bundle, predictor
from linnaeus_jax.tools import convert_torch as ct

from conftest import SMALL, tiny_config

DATA = os.path.join(os.path.dirname(__file__), "data", "pretrained")
CONVNEXT = {"official": "convnext_official.pth", "timm": "convnext_timm.safetensors"}
ROPEVIT = {"official": "ropevit_official.pth", "timm": "ropevit_timm.safetensors"}


def _fixture_model(dataset_dir="/unused", rope_depth=3, scan=True):
  """The reduced-width mFormerV1 the fixtures fit: dims 8-16-32-64, stage-1 depth 2, stage 3 of
  `rope_depth` blocks with 2 heads (head dim 16) and RoPE-ViT's LayerNorm eps."""
  c = tiny_config(dataset_dir)
  m = c.model
  m.convnext_stages.depths, m.convnext_stages.dims = [3, 2], [8, 16, 32, 64]
  m.rope_stages.depths, m.rope_stages.dims = [rope_depth, 1], [32, 64]
  m.rope_stages.num_heads, m.rope_stages.norm_eps = [2, 2], 1e-6
  m.scan_blocks = scan
  for i, t in enumerate(c.data.task_keys_h5):
    m.classification.heads[t].num_classes = 0 if dataset_dir != "/unused" else 5 - i
  return c


def _target_shapes(config):
  unscanned = config_lib.with_defaults(config)
  unscanned.model.scan_blocks = False
  return {p: tuple(v.shape) for p, v in ct._flatten(ct._abstract_params(unscanned)[0]).items()}


def _loaded_model(config, name, path):
  """The config's model with `path` mapped in by the `name` planner (no problems allowed)."""
  weights = pretrained.read_weights(path)
  shapes = pretrained._shapes(weights)
  tshapes = _target_shapes(config)
  plan = pretrained.PLANNERS[name](shapes, tshapes)
  record = pretrained.check(plan, shapes, tshapes)
  assert record["problems"] == [] and record["unknown"] == []
  model = models.build(config, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = pretrained.place(nnx.to_pure_dict(params), pretrained.apply(plan, weights),
                            config.model.scan_blocks)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state, rest), record


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


@pytest.mark.parametrize("layout,scan", [("official", True), ("timm", False)])
def test_convnext_stages_equal_the_source_model(layout, scan):
  model, record = _loaded_model(_fixture_model(scan=scan), "convnext",
                                os.path.join(DATA, CONVNEXT[layout]))
  assert record["layout"] == layout
  io = np.load(os.path.join(DATA, f"convnext_{layout}_io.npz"))

  @nnx.jit
  def forward(model, x, z):
    x = model.stage1(model.down0(model.stage0(model.stem_norm(model.stem_conv(x)))))
    return x, model.down1(x), model.down2(z)
  stage1, down1, down2 = forward(model, _nhwc(io["x"]), _nhwc(io["z"]))
  np.testing.assert_allclose(stage1, _nhwc(io["stage1"]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(down1, _nhwc(io["down1"]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(down2, _nhwc(io["down2"]), atol=1e-5, rtol=1e-5)
  # The source's stage-2/3 blocks, final norm and classifier are listed as unused, not mapped.
  assert not [k for k in record["mapped"] if "head" in k or k.startswith("norm.")]
  assert record["unused_count"] > 0 and record["folded"] == []


@pytest.mark.parametrize("layout", ["official", "timm"])
@pytest.mark.parametrize("depth", [2, 3])
def test_ropevit_blocks_equal_the_source_blocks(layout, depth):
  """Blocks 0..depth-1 on the same CLS + 4x4 tokens: LayerScale folded, per-block frequencies
  sliced, and our 2D RoPE against the RoPE-ViT authors' (and timm's) own."""
  model, record = _loaded_model(_fixture_model(rope_depth=depth, scan=depth == 3), "ropevit",
                                os.path.join(DATA, ROPEVIT[layout]))
  io = np.load(os.path.join(DATA, f"ropevit_{layout}_io.npz"))
  out = model.stage3(io["tokens"], train=False, grid_hw=(4, 4))
  np.testing.assert_allclose(out, io[f"out_{depth}"], atol=1e-5, rtol=1e-5)
  assert len(record["folded"]) == 2 * 3 if depth == 3 else len(record["folded"]) == 2 * 2
  assert ("blocks.2.*" in record["unused"]) == (depth == 2)


def test_ropevit_without_layerscale_folding_would_differ():
  """The check above is sensitive: dropping LayerScale (as the original did) changes the output."""
  path = os.path.join(DATA, ROPEVIT["official"])
  weights = pretrained.read_weights(path)
  for k in list(weights):
    if "gamma_" in k:
      weights[k] = np.ones_like(weights[k])
  config = _fixture_model()
  tshapes = _target_shapes(config)
  plan = pretrained.plan_ropevit(pretrained._shapes(weights), tshapes)
  model = models.build(config, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = pretrained.place(nnx.to_pure_dict(params), pretrained.apply(plan, weights), True)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  io = np.load(os.path.join(DATA, "ropevit_official_io.npz"))
  out = nnx.merge(graphdef, state, rest).stage3(io["tokens"], train=False, grid_hw=(4, 4))
  assert np.abs(np.asarray(out) - io["out_3"]).max() > 1e-2


# ----------------------------------------------------------------------------- Full size

PAIRS = {"sm": ("convnext_tiny", "rope_mixed_deit_small", "vit_small_patch16_rope_mixed_224"),
         "md": ("convnext_small", "rope_mixed_deit_small", "vit_small_patch16_rope_mixed_224"),
         "lg": ("convnext_large", "rope_mixed_deit_base", "vit_base_patch16_rope_mixed_224"),
         "xl": ("convnext_xlarge", "rope_mixed_deit_large", "vit_large_patch16_rope_mixed_224")}


def _shapes_file(name):
  with open(os.path.join(DATA, "shapes", f"{name}.json"), encoding="utf-8") as f:
    return {k: tuple(v) for k, v in json.load(f)["keys"].items()}


@functools.lru_cache
def _size_shapes(size):
  config = config_lib.base_config()
  config_lib.set_model_size(config, size)
  config.data.meta.components.ELEVATION.enabled = True
  for t in config.data.task_keys_h5:
    config.model.classification.heads[t].num_classes = 10
  return _target_shapes(config)


@pytest.mark.parametrize("size", list(PAIRS))
@pytest.mark.parametrize("layout", ["official", "timm"])
def test_full_size_sources_map_completely(size, layout):
  """Real key lists of ImageNet ConvNeXt and RoPE-ViT checkpoints onto sm/md/lg/xl: nothing
  unknown, nothing mis-shaped, and exactly the modules ImageNet lacks left random."""
  tshapes = _size_shapes(size)
  convnext, vit_official, vit_timm = PAIRS[size]
  loaded = set()
  for name, source in (("convnext", f"{convnext}_{layout}"),
                       ("ropevit", f"{vit_official}_official" if layout == "official"
                        else f"{vit_timm}_timm")):
    shapes = _shapes_file(source)
    plan = pretrained.PLANNERS[name](shapes, tshapes)
    record = pretrained.check(plan, shapes, tshapes)
    assert record["problems"] == [], (source, record["problems"])
    assert record["unknown"] == []
    assert record["mapped"] and len(record["mapped"]) + len(record["folded"]) + record[
        "unused_count"] == len(shapes)
    loaded |= {e.target for e in plan.entries}
  random = {p for p in tshapes if p not in loaded}
  assert {p[0] for p in random} == set(pretrained.NEW_MODULES)
  assert all(p in random for p in tshapes if p[0] in pretrained.NEW_MODULES)


# ----------------------------------------------------------------------------- Bad sources


def _write_safetensors(path, weights):
  save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, path)
  return path


def test_malformed_sources_fail_at_once_before_the_workdir(small_dataset, tmp_path):
  """A wrong shape and a missing block in one run, a foreign model and a truncated file in
  another: one error each, naming every problem, and no workdir."""
  conv = load_file(os.path.join(DATA, CONVNEXT["timm"]))
  conv["stages.0.blocks.1.mlp.fc1.weight"] = np.zeros((7, 8), np.float32)
  vit = load_file(os.path.join(DATA, ROPEVIT["timm"]))
  vit = {k: v for k, v in vit.items() if not k.startswith("blocks.2.")}
  c = _fixture_model(small_dataset[0])
  c.train.steps = 2
  c.model.init.convnext = _write_safetensors(str(tmp_path / "conv.safetensors"), conv)
  c.model.init.ropevit = _write_safetensors(str(tmp_path / "vit.safetensors"), vit)
  workdir = str(tmp_path / "run")
  with pytest.raises(pretrained.InitError) as e:
    train.run(c, workdir)
  msg = str(e.value)
  assert "stages.0.blocks.1.mlp.fc1.weight: shape [7, 8], expected [32, 8]" in msg
  assert "the ViT has 2 blocks, stage 3 needs 3" in msg and "blocks.2.attn.qkv.weight" in msg
  assert not os.path.exists(workdir)

  truncated = str(tmp_path / "cut.pth")
  with open(os.path.join(DATA, ROPEVIT["official"]), "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  c.model.init.convnext = os.path.join(DATA, ROPEVIT["official"])  # a ViT is no ConvNeXt
  c.model.init.ropevit = truncated
  with pytest.raises(pretrained.InitError) as e:
    train.run(c, workdir)
  msg = str(e.value)
  assert "model.init.convnext" in msg and "not a ConvNeXt checkpoint" in msg
  assert "model.init.ropevit" in msg and "cut.pth" in msg
  assert not os.path.exists(workdir)


def test_allow_partial_loads_what_fits_and_reports_the_rest(small_dataset, tmp_path):
  vit = load_file(os.path.join(DATA, ROPEVIT["timm"]))
  vit["blocks.0.attn.qkv.weight"] = np.zeros((96, 31), np.float32)
  c = _fixture_model(small_dataset[0])
  c.model.init.ropevit = _write_safetensors(str(tmp_path / "vit.safetensors"), vit)
  c.model.init.allow_partial = True
  loaded, report = pretrained.load(c, {})
  assert ("stage3", "blocks", 0, "attn", "qkv", "kernel") not in loaded
  assert ("stage3", "blocks", 1, "attn", "qkv", "kernel") in loaded
  assert any("blocks.0.attn.qkv.weight: shape [96, 31]" in p for p in report["problems"])
  assert "stage3/blocks/0/attn/qkv/kernel" in report["random"]


def test_allow_partial_with_nothing_loaded_is_an_error_and_normalisation_follows_loaded_sources(
    small_dataset, tmp_path):
  """A source that loads nothing (a foreign file) with allow_partial: an error, not a silently
  random model; the ImageNet statistics follow a ViT source only once it has loaded."""
  bad = _write_safetensors(str(tmp_path / "foreign.safetensors"),
                           {"something.else": np.zeros((3, 3), np.float32)})
  c = _fixture_model(small_dataset[0])
  c.model.init.ropevit = bad
  c.model.init.allow_partial = True
  with pytest.raises(pretrained.InitError, match="no weights were loaded from any source"):
    pretrained.load(c, {})
  c.model.init.convnext = os.path.join(DATA, CONVNEXT["timm"])
  c.model.init.ropevit = bad
  _, report = pretrained.load(c, {})
  assert pretrained.loaded_sources(report) == ["convnext"]
  changes, note = pretrained.normalization(c, pretrained.loaded_sources(report))
  assert "ImageNet" in note and changes["data.image_mean"] == pretrained.IMAGENET_MEAN
  c.model.init.convnext = ""
  assert pretrained.normalization(c, []) == ({}, None)  # the ViT source loaded nothing


# ----------------------------------------------------------------------------- Earlier models


def test_checkpoint_heads_reorder_by_taxon_id_or_reinitialise():
  """Pure planning: same classes in another order are permuted; other classes are new."""
  tshapes = {("head", "a", "fc", "kernel"): (4, 3), ("head", "a", "fc", "bias"): (3,),
             ("head", "b", "fc", "kernel"): (4, 2), ("head", "b", "fc", "bias"): (2,),
             ("stem_conv", "kernel"): (2, 2)}
  rng = np.random.default_rng(0)
  weights = {"head/a/fc/kernel": rng.normal(size=(4, 3)), "head/a/fc/bias": rng.normal(size=3),
             "head/b/fc/kernel": rng.normal(size=(4, 2)), "head/b/fc/bias": rng.normal(size=2),
             "stem_conv/kernel": rng.normal(size=(2, 2)),
             "meta_1/heads/GONE/fc/bias": rng.normal(size=2)}
  src = {"a": {0: 10, 1: 11, 2: 12}, "b": {0: 20, 1: 21}}
  dst = {"a": {0: 12, 1: 10, 2: 11}, "b": {0: 20, 1: 22}}
  plan = pretrained.plan_checkpoint(pretrained._shapes(weights), tshapes, src, dst)
  record = pretrained.check(plan, pretrained._shapes(weights), tshapes)
  assert record["problems"] == []
  out = pretrained.apply(plan, weights)
  np.testing.assert_allclose(out[("head", "a", "fc", "kernel")],
                             weights["head/a/fc/kernel"][:, [2, 0, 1]], rtol=1e-6)
  np.testing.assert_allclose(out[("head", "a", "fc", "bias")], weights["head/a/fc/bias"][[2, 0, 1]],
                             rtol=1e-6)
  assert ("head", "b", "fc", "kernel") not in out
  assert plan.heads == {"a": "loaded, reordered by taxon id",
                        "b": "new: the classes differ (2 here, 2 in the source, 1 shared)"}
  assert "meta_1/heads/GONE/*" in record["unused"] and "head/b/*" in record["unused"]
  # A backbone that does not fit is a problem, not a silent re-initialisation.
  weights["stem_conv/kernel"] = rng.normal(size=(3, 2))
  plan = pretrained.plan_checkpoint(pretrained._shapes(weights), tshapes, src, dst)
  assert "stem_conv/kernel: shape [3, 2], expected [2, 2]" in " ".join(
      pretrained.check(plan, pretrained._shapes(weights), tshapes)["problems"])


@pytest.mark.slow
def test_imagenet_init_then_finetune_on_another_dataset(small_dataset, tmp_path, capsys):
  """The fixture ConvNeXt + RoPE-ViT initialise a run (report, ImageNet mean/std recorded);
  that run initialises one on another synthetic dataset with more species (backbone loaded
  exactly, heads new); rerunning the latter resumes instead of initialising again."""
  c = _fixture_model(small_dataset[0])
  c.train.steps = 2
  c.model.init.convnext = os.path.join(DATA, CONVNEXT["official"])
  c.model.init.ropevit = os.path.join(DATA, ROPEVIT["timm"])
  source = str(tmp_path / "source")
  train.run(c, source)
  with open(os.path.join(source, "assets", "init_report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert {g for g, v in report["targets"].items() if v["random"]} == set(
      pretrained.NEW_MODULES)
  assert report["sources"]["ropevit"]["layout"] == "timm"
  with open(os.path.join(source, "assets", "preprocessing.json"), encoding="utf-8") as f:
    assert json.load(f)["image"]["mean"] == list(pretrained.IMAGENET_MEAN)
  assert "parameter values loaded" in capsys.readouterr().out

  other = str(tmp_path / "other_data")
  synthetic.generate(other, dataclasses.replace(SMALL, species_per_genus=3, seed=11),
                     verbose=False)
  c = _fixture_model(other)
  c.train.steps = 2
  c.model.init.checkpoint = source
  resolved, data = resolve_lib.resolve(c)
  loaded, report = pretrained.load(resolved, data.class_to_idx)
  src = pretrained.read_checkpoint(source, c)["weights"]
  np.testing.assert_array_equal(loaded[("stage3", "blocks", 0, "attn", "qkv", "kernel")],
                                src["stage3/blocks/0/attn/qkv/kernel"])
  w = predictor.load_workdir(source)  # the same model as a bundle is the same source
  bundle.write(str(tmp_path / "bundle"), w["config"], w["variables"], w["preprocessing"],
               w["class_maps"], w["taxonomy_json"], {}, None)
  from_bundle = pretrained.read_checkpoint(str(tmp_path / "bundle"), c)
  assert from_bundle["kind"] == "bundle" and from_bundle["class_maps"] == w["class_maps"]
  np.testing.assert_array_equal(from_bundle["weights"]["stage3/blocks/0/attn/qkv/kernel"],
                                src["stage3/blocks/0/attn/qkv/kernel"])
  assert {g for g, v in report["targets"].items() if v["random"]} == {"head"}
  workdir = str(tmp_path / "finetune")
  train.run(c, workdir)
  out = capsys.readouterr().out
  assert "head taxa_L10: new: the classes differ" in out
  assert "data.image_mean/std set to the source model's" in out  # passed on from the source
  c.train.steps = 3
  train.run(c, workdir)
  assert "model.init not applied: the run resumes from its own checkpoint" in (
      capsys.readouterr().out)
  with open(os.path.join(workdir, "assets", "init_report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["resumed"][0]["step"] == 2 and "checkpoint" in report["sources"]


def test_normalization_takes_the_sources_unless_set():
  c = _fixture_model()
  c.model.init.ropevit = os.path.join(DATA, ROPEVIT["timm"])
  changes, note = pretrained.normalization(c)
  assert "ImageNet" in note and changes == {"data.image_mean": pretrained.IMAGENET_MEAN,
                                            "data.image_std": pretrained.IMAGENET_STD}
  c.data.image_mean, c.data.image_std = (0.5,) * 3, (0.25,) * 3
  assert pretrained.normalization(c) == ({}, None)  # set values win
  c.data.image_mean, c.data.image_std = (), ()
  c.model.init.match_normalization = False
  assert pretrained.normalization(c) == ({}, None)

def test_axial_or_ape_vits_are_refused():
  shapes = pretrained._shapes(pretrained.read_weights(os.path.join(DATA, ROPEVIT["official"])))
  tshapes = _target_shapes(_fixture_model())
  ape = dict(shapes, pos_embed=(1, 16, 32))
  assert any("pos_embed" in p for p in pretrained.check(
      pretrained.plan_ropevit(ape, tshapes), ape, tshapes)["problems"])
  axial = {k: v for k, v in shapes.items() if k != "freqs"}
  assert any("not a RoPE-Mixed ViT" in p for p in pretrained.check(
      pretrained.plan_ropevit(axial, tshapes), axial, tshapes)["problems"])


def test_an_original_checkpoint_initialises_by_class_index(tmp_path):
  """An original state dict (here written by convert_torch.to_torch, as .npz of torch names):
  the backbone loads exactly; heads with the same class counts load by index, others are new."""
  c = _fixture_model()
  variables = {"params": nnx.to_pure_dict(nnx.split(models.build(c, nnx.Rngs(5)),
                                                    nnx.Param, ...)[1])}
  path = str(tmp_path / "original.npz")
  np.savez(path, **ct.to_torch(jax.device_get(variables), c))
  c.model.classification.heads["taxa_L10"].num_classes = 7  # another species list
  c.model.init.checkpoint = path
  class_to_idx = {t: {str(100 * j + i): i for i in range(c.model.classification.heads[t]
                                                          .num_classes)}
                  for j, t in enumerate(c.data.task_keys_h5)}
  loaded, report = pretrained.load(c, class_to_idx)
  heads = report["sources"]["checkpoint"]["heads"]
  assert heads["taxa_L10"] == "new: 7 classes here, 5 in the source"
  assert heads["taxa_L20"] == "loaded by class index (the source has no class map)"
  np.testing.assert_array_equal(loaded[("head", "taxa_L20", "fc", "kernel")],
                                variables["params"]["head"]["taxa_L20"]["fc"]["kernel"])
  np.testing.assert_array_equal(loaded[("stage3", "blocks", 1, "attn", "freqs")],
                                variables["params"]["stage3"]["blocks"]["attn"]["freqs"][1])
  # ... and the learned missing-metadata tokens, which the original does not have.
  assert report["random"] == ["head/taxa_L10/fc/bias", "head/taxa_L10/fc/kernel",
                              "meta_1/missing_tokens", "meta_2/missing_tokens"]
  # The same file converted by tools.convert_torch is the same source.
  converted = str(tmp_path / "converted")
  ct.run(path, _fixture_model(), converted)
  src = pretrained.read_checkpoint(converted, c)
  assert src["kind"] == "converted original checkpoint" and src["class_maps"] is None
  assert src["weights"].keys() == pretrained.read_checkpoint(path, c)["weights"].keys()
  np.testing.assert_array_equal(src["weights"]["stage3/blocks/1/attn/freqs"],
                                variables["params"]["stage3"]["blocks"]["attn"]["freqs"][1])


def test_bfloat16_safetensors_read_as_float32(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from safetensors.flax import save_file as save_jax  # pylint: disable=g-import-not-at-top
  x = np.array([1.0, -2.5, 3.140625], np.float32)  # exact in bfloat16
  path = str(tmp_path / "bf16.safetensors")
  save_jax({"module.w": jnp.asarray(x, jnp.bfloat16)}, path)
  weights = pretrained.read_weights(path)
  assert list(weights) == ["w"] and weights["w"].dtype == np.float32
  np.testing.assert_array_equal(weights["w"], x)
