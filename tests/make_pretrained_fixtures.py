"""Small fixtures from the official PyTorch model code, for tests of our pretrained-weight mapping.

Run with a Python that has torch (CPU), timm, safetensors and numpy, never linnaeus_jax's venv
(torch is not our dependency), against checkouts of facebookresearch/ConvNeXt and
naver-ai/rope-vit kept outside this repository (their code is imported from there, never copied
here):

    python tests/make_pretrained_fixtures.py --convnext_repo=/tmp/src/convnext \\
        --ropevit_repo=/tmp/src/ropevit --out=tests/data/pretrained

It writes, under --out:

  convnext_official.pth + convnext_official_io.npz   official ConvNeXt (models/convnext.py),
      depths [3,2,1,1], dims [8,16,32,64], 10 classes; torch.save({"model": state_dict}) like the
      released checkpoints. io: x (2,3,64,64) -> stage1 (after downsample_layers[0], stages[0],
      downsample_layers[1], stages[1]); down1 = downsample_layers[2](stage1); z (2,32,4,4) ->
      down2 = downsample_layers[3](z). All NCHW float32.
  convnext_timm.safetensors + convnext_timm_io.npz   timm.models.convnext.ConvNeXt, same sizes;
      stage1 = stages[1](stages[0](stem(x))), down1 = stages[2].downsample(stage1),
      down2 = stages[3].downsample(z); same x and z as the official io.
  ropevit_official.pth + ropevit_official_io.npz   rope-vit's rope_vit_models built like its
      rope_mixed_deit_small_patch16_LS (RoPE-Mixed, theta 10, LayerScale, LN eps 1e-6) at
      img 64, patch 16, width 32, depth 3, 2 heads, 10 classes. io: tokens (2, 1+16, 32) (CLS, then
      a 4x4 patch grid in raster order), out_2 / out_3 = tokens after blocks 0..1 / 0..2 (before
      the final norm), each block given freqs_cis[i] of model.compute_cis(model.freqs, t_x, t_y)
      for the 4x4 grid, as forward_features does; cis_cos / cis_sin = that freqs_cis (depth,
      heads, 16, head_dim/2).
  ropevit_timm.safetensors + ropevit_timm_io.npz   the same reduced model as timm's Eva class
      (the vit_*_patch16_rope_mixed_224 configs), same tokens; out_2 / out_3 from timm's own
      blocks with timm's own rope embedding for the 4x4 grid (rope_embed: (depth, heads, 16,
      2*head_dim), [sin | cos], each interleaved).
  shapes/*.json   full-size key names and shapes (built on the meta device, no weights):
      {"source": ..., "keys": {name: [d0, d1, ...]}} in state_dict order.

Every parameter is perturbed so that nothing is trivial (LayerScale 1e-6, zero biases and unit
LayerNorm weights would hide mapping bugs): LayerNorm weights 1 + 0.2 N(0,1), LayerScale gammas
U[0.3, 1], conv / linear weights N(0,1)/sqrt(fan_in) (activations stay O(1)), rope freqs keep
their init times U[0.5, 2], everything else (biases, cls token) 0.2 N(0,1). Everything is seeded
and runs single-threaded on CPU in float32 under torch.no_grad(): two runs write identical files.
The script also checks (and fails otherwise) that timm's own converter maps the official ConvNeXt
weights onto timm's ConvNeXt, and that official rope-vit weights (freqs reshaped to timm's
rope.freqs) reproduce the official block outputs in timm's Eva.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import types
import warnings
import zipfile
from functools import partial

import numpy as np
import safetensors.torch
import timm
import timm.models.convnext
import timm.models.eva
import torch
from torch import nn

FIXTURE_SEED = 0
INPUT_SEED = 1234
# depths [3, 3, 1, 1] would make convnext_official.pth 310 KB (torch's zip format adds ~200 bytes
# per tensor), over the 300 KB fixture budget; stage 1 gets 2 blocks instead.
CONVNEXT_SMALL = dict(in_chans=3, num_classes=10, depths=[3, 2, 1, 1], dims=[8, 16, 32, 64])
ROPEVIT_SMALL = dict(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4,
                     num_classes=10)
GRID = 4  # 64 / 16
TIMM_ROPE_MIXED = ["vit_small_patch16_rope_mixed_224", "vit_base_patch16_rope_mixed_224",
                   "vit_large_patch16_rope_mixed_224"]


# --------------------------------------------------------------------------- importing the checkouts


@contextlib.contextmanager
def _official_import_env():
  """Import environment for the official files (the checkouts stay untouched).

  They decorate their builders with `timm.models.registry.register_model`; letting that reach
  the installed timm would overwrite timm's own `convnext_tiny` etc. in its registry, so while
  they import, `timm.models.registry` is a stand-in whose register_model returns the function.
  `timm.models.layers` (old path) is aliased to `timm.layers` if this timm no longer has it.
  """
  saved = {k: sys.modules.get(k) for k in ("timm.models.registry", "timm.models.layers")}
  shim = types.ModuleType("timm.models.registry")
  shim.register_model = lambda fn: fn
  sys.modules["timm.models.registry"] = shim
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      import timm.models.layers  # pylint: disable=import-outside-toplevel,unused-import,redefined-outer-name
    except ImportError:
      import timm.layers  # pylint: disable=import-outside-toplevel
      sys.modules["timm.models.layers"] = timm.layers
    try:
      yield
    finally:
      for k, v in saved.items():
        if v is None:
          sys.modules.pop(k, None)
        else:
          sys.modules[k] = v


def _load_file(name: str, path: str) -> types.ModuleType:
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def import_official(convnext_repo: str, ropevit_repo: str):
  with _official_import_env():
    convnext = _load_file("_official_convnext", os.path.join(convnext_repo, "models", "convnext.py"))
    # models_v2_rope.py does `from models_v2 import ...`: provide that name while it imports.
    had = sys.modules.get("models_v2")
    _load_file("models_v2", os.path.join(ropevit_repo, "deit", "models_v2.py"))
    try:
      rope = _load_file("_official_models_v2_rope", os.path.join(ropevit_repo, "deit", "models_v2_rope.py"))
    finally:
      if had is None:
        sys.modules.pop("models_v2", None)
      else:
        sys.modules["models_v2"] = had
  return convnext, rope


# --------------------------------------------------------------------------- helpers


def _is_layernorm(mod: nn.Module) -> bool:
  # nn.LayerNorm and subclasses (timm LayerNorm / LayerNorm2d), and official ConvNeXt's own class
  return isinstance(mod, nn.LayerNorm) or type(mod).__name__ == "LayerNorm"


@torch.no_grad()
def perturb_(model: nn.Module, gen: torch.Generator) -> None:
  """Deterministic (given gen) perturbation of every parameter, in named_parameters() order."""
  for name, p in model.named_parameters():
    owner_name, _, local = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if _is_layernorm(owner) and local == "weight":
      p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    elif local in ("gamma", "gamma_1", "gamma_2"):  # LayerScale
      p.copy_(0.3 + 0.7 * torch.rand(p.shape, generator=gen))
    elif local == "freqs":  # RoPE-Mixed learned frequencies: keep init, scale by U[0.5, 2]
      p.mul_(0.5 + 1.5 * torch.rand(p.shape, generator=gen))
    elif local == "weight" and p.ndim >= 2:  # conv / linear
      fan_in = p[0].numel()
      p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    else:  # biases, cls token
      p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def save_npz(path: str, arrays: dict) -> None:
  """np.savez with fixed zip timestamps, so reruns write byte-identical files."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    for k, v in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(v), allow_pickle=False)
      zf.writestr(zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def np32(t: torch.Tensor) -> np.ndarray:
  return t.detach().to(torch.float32).contiguous().numpy()


def save_official(path: str, model: nn.Module) -> dict:
  sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  torch.save({"model": sd}, path)
  return sd


def save_timm(path: str, model: nn.Module) -> dict:
  sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  # one metadata entry only: safetensors writes metadata in hash-map order, which varies by run
  safetensors.torch.save_file(sd, path, metadata={"format": "pt"})
  os.chmod(path, 0o644)
  return sd


def inputs():
  g = torch.Generator().manual_seed(INPUT_SEED)
  x = torch.randn(2, 3, 64, 64, generator=g)
  z = torch.randn(2, 32, 4, 4, generator=g)
  tokens = torch.randn(2, 1 + GRID * GRID, ROPEVIT_SMALL["embed_dim"], generator=g)
  return x, z, tokens


def describe(name: str, sd: dict) -> None:
  total = sum(v.numel() for v in sd.values())
  print(f"{name}: {len(sd)} keys, {total:,} values")
  for k, v in sd.items():
    print(f"  {k} {list(v.shape)} {str(v.dtype).replace('torch.', '')}")


def assert_close(what: str, a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
  diff = (a - b).abs().max().item()
  scale = b.abs().max().item()
  print(f"check {what}: max|diff| = {diff:.3g} (max|ref| = {scale:.3g})")
  if not diff <= atol * max(1.0, scale):
    raise AssertionError(f"{what}: max|diff| {diff} > {atol} * max(1, {scale})")


# --------------------------------------------------------------------------- fixtures


@torch.no_grad()
def convnext_fixtures(official_mod, out: str, x: torch.Tensor, z: torch.Tensor) -> None:
  torch.manual_seed(FIXTURE_SEED)
  off = official_mod.ConvNeXt(layer_scale_init_value=1e-6, **CONVNEXT_SMALL)
  perturb_(off, torch.Generator().manual_seed(FIXTURE_SEED + 1))
  off = off.float().eval()
  sd_off = save_official(os.path.join(out, "convnext_official.pth"), off)
  describe("convnext_official.pth ['model']", sd_off)
  d = off.downsample_layers
  s = off.stages
  stage1 = s[1](d[1](s[0](d[0](x))))
  down1 = d[2](stage1)
  down2 = d[3](z)
  save_npz(os.path.join(out, "convnext_official_io.npz"),
           dict(x=np32(x), stage1=np32(stage1), down1=np32(down1), z=np32(z), down2=np32(down2)))

  cfg = dict(CONVNEXT_SMALL, depths=tuple(CONVNEXT_SMALL["depths"]), dims=tuple(CONVNEXT_SMALL["dims"]))
  torch.manual_seed(FIXTURE_SEED)
  tm = timm.models.convnext.ConvNeXt(ls_init_value=1e-6, **cfg)
  perturb_(tm, torch.Generator().manual_seed(FIXTURE_SEED + 2))
  tm = tm.float().eval()
  sd_tm = save_timm(os.path.join(out, "convnext_timm.safetensors"), tm)
  describe("convnext_timm.safetensors", sd_tm)
  t_stage1 = tm.stages[1](tm.stages[0](tm.stem(x)))
  t_down1 = tm.stages[2].downsample(t_stage1)
  t_down2 = tm.stages[3].downsample(z)
  save_npz(os.path.join(out, "convnext_timm_io.npz"),
           dict(x=np32(x), stage1=np32(t_stage1), down1=np32(t_down1), z=np32(z), down2=np32(t_down2)))

  # sanity: timm's own FB->timm converter maps the official weights onto timm's layout
  torch.manual_seed(FIXTURE_SEED)
  tm2 = timm.models.convnext.ConvNeXt(ls_init_value=1e-6, **cfg).eval()
  tm2.load_state_dict(timm.models.convnext.checkpoint_filter_fn({"model": sd_off}, tm2), strict=True)
  assert_close("official ConvNeXt weights in timm ConvNeXt: stage1",
               tm2.stages[1](tm2.stages[0](tm2.stem(x))), stage1)
  assert_close("... down1", tm2.stages[2].downsample(stage1), down1)
  assert_close("... down2", tm2.stages[3].downsample(z), down2)


def official_ropevit(rope_mod, **overrides) -> nn.Module:
  """rope_vit_models exactly as rope_mixed_deit_small_patch16_LS builds it, sizes overridden."""
  kw = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            block_layers=rope_mod.RoPE_Layer_scale_init_Block, Attention_block=rope_mod.RoPEAttention,
            rope_theta=10.0, rope_mixed=True)
  kw.update(overrides)
  return rope_mod.rope_vit_models(**kw)


def timm_rope_mixed(**overrides) -> nn.Module:
  """timm's Eva with the arguments of its vit_small_patch16_rope_mixed_224, sizes overridden."""
  kw = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
            attn_type="rope", qkv_bias=True, init_values=1e-5, class_token=True, global_pool="token",
            use_abs_pos_emb=False, use_rot_pos_emb=True, rope_grid_indexing="xy", rope_temperature=10.0,
            rope_type="mixed")
  kw.update(overrides)
  return timm.models.eva.Eva(**kw)


def official_to_timm_ropevit(sd: dict, num_heads: int) -> dict:
  """naver-ai/rope-vit RoPE-Mixed state dict -> timm Eva state dict (what the check below proves)."""
  out = {}
  for k, v in sd.items():
    if k in ("freqs_t_x", "freqs_t_y"):
      continue  # grid positions: timm recomputes them (non-persistent rope.t_x / rope.t_y)
    if k == "freqs":  # (2, depth, heads * head_dim/2) -> (2, depth, heads, head_dim/2)
      out["rope.freqs"] = v.reshape(v.shape[0], v.shape[1], num_heads, -1)
      continue
    out[k] = v
  return out


@torch.no_grad()
def ropevit_fixtures(rope_mod, out: str, tokens: torch.Tensor, with_timm: bool) -> None:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.cuda.amp.autocast deprecation inside compute_mixed_cis
    torch.manual_seed(FIXTURE_SEED)
    off = official_ropevit(rope_mod, **ROPEVIT_SMALL)
    perturb_(off, torch.Generator().manual_seed(FIXTURE_SEED + 3))
    off = off.float().eval()
    sd_off = save_official(os.path.join(out, "ropevit_official.pth"), off)
    describe("ropevit_official.pth ['model']", sd_off)
    t_x, t_y = rope_mod.init_t_xy(end_x=GRID, end_y=GRID)
    assert torch.equal(t_x, off.freqs_t_x) and torch.equal(t_y, off.freqs_t_y)
    freqs_cis = off.compute_cis(off.freqs, t_x, t_y)  # complex (depth, heads, 16, head_dim/2)
    x = tokens
    outs = {}
    for i, blk in enumerate(off.blocks):
      x = blk(x, freqs_cis=freqs_cis[i])
      outs[i + 1] = x
  save_npz(os.path.join(out, "ropevit_official_io.npz"),
           dict(tokens=np32(tokens), out_2=np32(outs[2]), out_3=np32(outs[3]),
                cis_cos=np32(freqs_cis.real), cis_sin=np32(freqs_cis.imag)))
  if not with_timm:
    return

  torch.manual_seed(FIXTURE_SEED)
  tm = timm_rope_mixed(**ROPEVIT_SMALL)
  perturb_(tm, torch.Generator().manual_seed(FIXTURE_SEED + 4))
  tm = tm.float().eval()
  sd_tm = save_timm(os.path.join(out, "ropevit_timm.safetensors"), tm)
  describe("ropevit_timm.safetensors", sd_tm)
  rope = tm.rope.get_embed()  # (depth, heads, 16, 2 * head_dim)
  x = tokens
  touts = {}
  for i, blk in enumerate(tm.blocks):
    x = blk(x, rope=rope[i])
    touts[i + 1] = x
  save_npz(os.path.join(out, "ropevit_timm_io.npz"),
           dict(tokens=np32(tokens), out_2=np32(touts[2]), out_3=np32(touts[3]), rope_embed=np32(rope)))

  # sanity: official weights, converted, reproduce the official outputs in timm's Eva
  tm2 = timm_rope_mixed(**ROPEVIT_SMALL).eval()
  tm2.load_state_dict(official_to_timm_ropevit(sd_off, ROPEVIT_SMALL["num_heads"]), strict=True)
  rope2 = tm2.rope.get_embed()
  x = tokens
  for i, blk in enumerate(tm2.blocks):
    x = blk(x, rope=rope2[i])
    if i == 1:
      assert_close("official rope-vit weights in timm Eva: out_2", x, outs[2])
  assert_close("... out_3", x, outs[3])


# --------------------------------------------------------------------------- full-size key lists


@contextlib.contextmanager
def _meta_device():
  """torch.device('meta') as default; official ConvNeXt calls .item() on a torch.linspace for its
  drop-path rates, which a meta tensor cannot do, so linspace stays on the CPU meanwhile."""
  orig = torch.linspace

  def cpu_linspace(*args, **kwargs):
    kwargs["device"] = "cpu"
    return orig(*args, **kwargs)

  torch.linspace = cpu_linspace
  try:
    with torch.device("meta"), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    torch.linspace = orig


def write_shapes(path: str, source: str, model: nn.Module) -> None:
  sd = model.state_dict()
  lines = [f"    {json.dumps(k)}: {json.dumps([int(d) for d in v.shape])}" for k, v in sd.items()]
  with open(path, "w", encoding="utf-8") as f:
    f.write("{\n")
    f.write(f"  \"source\": {json.dumps(source)},\n")
    f.write("  \"keys\": {\n" + ",\n".join(lines) + "\n  }\n}\n")
  print(f"{os.path.basename(path)}: {len(sd)} keys, {sum(v.numel() for v in sd.values()):,} values")


def shape_fixtures(convnext_mod, rope_mod, out: str, with_timm_rope: bool) -> None:
  d = os.path.join(out, "shapes")
  os.makedirs(d, exist_ok=True)
  convnext = {
      "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
      "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
      "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
      "xlarge": ([3, 3, 27, 3], [256, 512, 1024, 2048]),
  }
  for name, (depths, dims) in convnext.items():
    with _meta_device():
      m = convnext_mod.ConvNeXt(in_chans=3, num_classes=1000, depths=depths, dims=dims)
    write_shapes(os.path.join(d, f"convnext_{name}_official.json"),
                 f"facebookresearch/ConvNeXt models/convnext.py ConvNeXt(in_chans=3, num_classes=1000, "
                 f"depths={depths}, dims={dims}) on the meta device", m)
    with _meta_device():
      m = timm.create_model(f"convnext_{name}", pretrained=False)
    write_shapes(os.path.join(d, f"convnext_{name}_timm.json"),
                 f"timm {timm.__version__} timm.create_model('convnext_{name}', pretrained=False) "
                 "on the meta device", m)
  for size in ("small", "base", "large"):
    builder = f"rope_mixed_deit_{size}_patch16_LS"
    with _meta_device():
      m = getattr(rope_mod, builder)(num_classes=1000)
    write_shapes(os.path.join(d, f"rope_mixed_deit_{size}_official.json"),
                 f"naver-ai/rope-vit deit/models_v2_rope.py {builder}(num_classes=1000) on the meta device", m)
  if with_timm_rope:
    for name in TIMM_ROPE_MIXED:
      with _meta_device():
        m = timm.create_model(name, pretrained=False)
      write_shapes(os.path.join(d, f"{name}_timm.json"),
                   f"timm {timm.__version__} timm.create_model('{name}', pretrained=False) on the meta device", m)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  ap.add_argument("--convnext_repo", required=True, help="checkout of facebookresearch/ConvNeXt")
  ap.add_argument("--ropevit_repo", required=True, help="checkout of naver-ai/rope-vit")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  print(f"torch {torch.__version__}, timm {timm.__version__}")

  convnext_mod, rope_mod = import_official(os.path.abspath(args.convnext_repo),
                                           os.path.abspath(args.ropevit_repo))
  with_timm_rope = all(n in timm.list_models() for n in TIMM_ROPE_MIXED)
  print(f"timm RoPE-Mixed ViTs present: {with_timm_rope}")
  x, z, tokens = inputs()
  convnext_fixtures(convnext_mod, args.out, x, z)
  ropevit_fixtures(rope_mod, args.out, tokens, with_timm_rope)
  shape_fixtures(convnext_mod, rope_mod, args.out, with_timm_rope)


if __name__ == "__main__":
  main()
