"""Initial weights (docs/finetuning.md): ImageNet ConvNeXt and RoPE-ViT checkpoints stitched into
mFormerV1 (`model.init.convnext`, `model.init.ropevit`), or an earlier model to fine-tune
(`model.init.checkpoint`).

Every source is mapped through an explicit table, planned on names and shapes alone (so that
full-size layouts are checked without weights): each source tensor is mapped, folded (RoPE-ViT's
LayerScale into the projection before it) or deliberately unused; each target parameter is
loaded or newly initialised. Unknown keys, missing keys and shape mismatches of every source are
collected into one `InitError` (`model.init.allow_partial` turns them into a report).
Paths are the unscanned ones (`stage3/blocks/<i>/...`), as `tools/convert_torch.py` uses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from typing import Callable

import numpy as np

from linnaeus_jax.tools import convert_torch, torch_pickle

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Modules the ImageNet sources cannot provide (they have no counterpart there).
NEW_MODULES = ("stage4", "cls_token_2", "norm_2", "meta_1", "meta_2", "cl_1_fc", "cl_1_norm",
               "aggregate_w", "aggregate_b", "final_norm", "head")


class InitError(ValueError):
  """The initial weights do not fit the model; lists every problem of every source."""


@dataclasses.dataclass
class Entry:
  """One target parameter made from source tensors: `fn(*arrays)`, each source checked against
  its expected shape first."""
  target: tuple
  sources: tuple[tuple[str, tuple], ...]  # (key, expected shape)
  fn: Callable = lambda x: x
  folded: tuple[str, ...] = ()  # sources that are folded in rather than copied


@dataclasses.dataclass
class Plan:
  """A source's mapping onto the target: entries, and the keys it leaves unused (why)."""
  name: str
  layout: str
  entries: list[Entry]
  unused: dict[str, str]  # key pattern (fnmatch) -> why
  problems: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  heads: dict[str, str] = dataclasses.field(default_factory=dict)  # checkpoint: task -> status


# ----------------------------------------------------------------------------- Reading


def read_weights(path: str) -> dict[str, np.ndarray]:
  """{name: array} from `.safetensors`, `.npz` or a `torch.save` file (`.pth`/`.pt`/`.bin`, read
  without torch and without running its pickle); `model` / `state_dict` / `state_dict_ema`
  wrappers unwrapped and `module.` prefixes stripped."""
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      try:
        weights = load_file(path)
      except TypeError as e:  # bfloat16 has no numpy dtype name: read through jax
        if "bfloat16" not in str(e):
          raise
        from safetensors.flax import load_file as load_jax  # pylint: disable=g-import-not-at-top
        weights = {k: np.asarray(v, np.float32) for k, v in load_jax(path).items()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise InitError(f"{path}: not a readable .safetensors file: {e}") from None
    out = {torch_pickle.strip_prefixes(k): v.astype(np.float32) if v.dtype.name == "bfloat16"
           else v for k, v in weights.items()}  # as torch_pickle reads bfloat16
  else:
    try:
      out = torch_pickle.load_torch_checkpoint(path)
    except torch_pickle.TorchFileError as e:
      raise InitError(str(e)) from None
  return out


def _shapes(weights: dict) -> dict[str, tuple]:
  return {k: tuple(int(n) for n in np.shape(v)) for k, v in weights.items()}


# ----------------------------------------------------------------------------- Layout helpers

_DENSE, _CONV = convert_torch._LAYOUTS["dense"], convert_torch._LAYOUTS["conv"]  # pylint: disable=protected-access


def _copy(target, key, shape) -> Entry:
  return Entry(target, ((key, tuple(shape)),))


def _layout(target, key, shape, layout) -> Entry:
  to_ours, _, torch_shape = layout
  return Entry(target, ((key, torch_shape(shape)),), lambda x: to_ours(x))


def _ln(target, key, tshapes) -> list[Entry]:
  return [_copy((*target, "norm", p), f"{key}.{q}", tshapes[(*target, "norm", p)])
          for p, q in (("scale", "weight"), ("bias", "bias"))]


def _kb(target, key, tshapes, layout) -> list[Entry]:
  return [_layout((*target, "kernel"), f"{key}.weight", tshapes[(*target, "kernel")], layout),
          _copy((*target, "bias"), f"{key}.bias", tshapes[(*target, "bias")])]


def _prefix_index(keys, prefix: str) -> set[int]:
  """The block indices i of keys `<prefix>.<i>.*`."""
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def _depth(tshapes, stage: str) -> int:
  return len({p[2] for p in tshapes if p[0] == stage and p[1] == "blocks"})


# ----------------------------------------------------------------------------- ConvNeXt

# (stem conv, stem norm, block prefix of stage s, block names, downsample k -> (norm, conv))
CONVNEXT_LAYOUTS = {
    "official": dict(
        stem=("downsample_layers.0.0", "downsample_layers.0.1"), block="stages.{s}.{i}",
        names=("dwconv", "norm", "pwconv1", "pwconv2", "gamma"),
        down=lambda k: (f"downsample_layers.{k}.0", f"downsample_layers.{k}.1"),
        unused={"stages.2.*": "ConvNeXt stage 2 (mFormerV1 has RoPE blocks there)",
                "stages.3.*": "ConvNeXt stage 3 (mFormerV1 has RoPE blocks there)",
                "norm.*": "ConvNeXt's final norm", "head.*": "ImageNet classifier"}),
    "timm": dict(
        stem=("stem.0", "stem.1"), block="stages.{s}.blocks.{i}",
        names=("conv_dw", "norm", "mlp.fc1", "mlp.fc2", "gamma"),
        down=lambda k: (f"stages.{k}.downsample.0", f"stages.{k}.downsample.1"),
        unused={"stages.2.blocks.*": "ConvNeXt stage 2 (mFormerV1 has RoPE blocks there)",
                "stages.3.blocks.*": "ConvNeXt stage 3 (mFormerV1 has RoPE blocks there)",
                "norm_pre.*": "ConvNeXt's pre-head norm", "head.*": "ImageNet classifier"}),
}


def convnext_layout(keys) -> str | None:
  if any(k.startswith("downsample_layers.") for k in keys):
    return "official"
  if "stem.0.weight" in keys and any(k.startswith("stages.0.blocks.") for k in keys):
    return "timm"
  return None


def plan_convnext(sshapes: dict, tshapes: dict) -> Plan:
  """ConvNeXt stem, stages 0-1 and its three downsamplers -> stem, stage0-1, down0-2."""
  layout = convnext_layout(sshapes)
  if layout is None:
    return Plan("convnext", "unknown", [], {}, [
        "not a ConvNeXt checkpoint in the official (downsample_layers.*, stages.i.j.*) or the "
        f"timm (stem.*, stages.i.blocks.j.*) layout; its first keys: {sorted(sshapes)[:6]}"])
  lay = CONVNEXT_LAYOUTS[layout]
  entries = _kb(("stem_conv",), lay["stem"][0], tshapes, _CONV)
  entries += _ln(("stem_norm",), lay["stem"][1], tshapes)
  unused = dict(lay["unused"])
  for s in (0, 1):
    ours = f"stage{s}"
    for i in range(_depth(tshapes, ours)):
      key, o = lay["block"].format(s=s, i=i), (ours, "blocks", i)
      dw, norm, fc1, fc2, gamma = lay["names"]
      entries += _kb((*o, "dwconv"), f"{key}.{dw}", tshapes, _CONV)
      entries += _ln((*o, "norm"), f"{key}.{norm}", tshapes)
      entries += _kb((*o, "pwconv1"), f"{key}.{fc1}", tshapes, _DENSE)
      entries += _kb((*o, "pwconv2"), f"{key}.{fc2}", tshapes, _DENSE)
      entries.append(_copy((*o, "gamma"), f"{key}.{gamma}", tshapes[(*o, "gamma")]))
    prefix = lay["block"].format(s=s, i="").rstrip(".")
    for i in _prefix_index(sshapes, prefix) - set(range(_depth(tshapes, ours))):
      unused[f"{prefix}.{i}.*"] = f"ConvNeXt stage {s} block {i}: mFormerV1's stage is shallower"
  for k in range(3):  # ConvNeXt's downsample k+1 (LN, conv) -> our down{k}
    norm, conv = lay["down"](k + 1)
    entries += _ln((f"down{k}", "norm"), norm, tshapes)
    entries += _kb((f"down{k}", "conv"), conv, tshapes, _CONV)
  return Plan("convnext", layout, entries, unused)


# ----------------------------------------------------------------------------- RoPE-ViT


def _fold_kernel(w, gamma):  # gamma * (W x + b) = (gamma W) x + gamma b; W torch (out, in)
  return (w * gamma[:, None]).T


def plan_ropevit(sshapes: dict, tshapes: dict) -> Plan:
  """RoPE-Mixed ViT blocks 0..n-1, CLS token and final norm -> stage3 blocks, cls_token_1,
  norm_1; naver-ai/rope-vit's DeiT-III checkpoints (`freqs` (2, depth, heads * P)) or timm's
  (`rope.freqs` (2, depth, heads, P)), P = head_dim / 2.

  LayerScale gamma_1 / gamma_2 are folded into attn.proj / mlp.fc2 (our blocks have none); each
  block's (2, heads, P) frequencies are its slice of the model-level ones; their angle
  x*f0 + y*f1 on interleaved channel pairs is ours.
  """
  layout, fkey = ("timm", "rope.freqs") if "rope.freqs" in sshapes else ("official", "freqs")
  plan = Plan("ropevit", layout, [], {
      "patch_embed.*": "ViT patch embedding (the ConvNeXt stages make stage 3's tokens)",
      "head.*": "ImageNet classifier", "freqs_t_x": "token x positions (recomputed per grid)",
      "freqs_t_y": "token y positions (recomputed per grid)", "fc_norm.*": "pooled-feature norm"})
  blocks = _prefix_index(sshapes, "blocks")
  if not blocks or "cls_token" not in sshapes:
    plan.layout = "unknown"
    plan.problems.append("not a RoPE-ViT checkpoint (blocks.i.*, cls_token, freqs); its first "
                         f"keys: {sorted(sshapes)[:6]}")
    return plan
  n = _depth(tshapes, "stage3")
  dim = tshapes[("cls_token_1",)][-1]
  width = sshapes["cls_token"][-1]
  if width != dim:
    plan.problems.append(f"the ViT's width is {width} but stage 3's is {dim}: use a RoPE-ViT of "
                         "the model size's stage-3 width (docs/finetuning.md)")
  if len(blocks) < n:
    plan.problems.append(f"the ViT has {len(blocks)} blocks, stage 3 needs {n}")
  heads, p = tshapes[("stage3", "blocks", 0, "attn", "freqs")][1:]
  if fkey not in sshapes:
    plan.problems.append("no `freqs`: not a RoPE-Mixed ViT (axial RoPE-ViTs have fixed "
                         "frequencies that our mixed blocks cannot take)")
  if "pos_embed" in sshapes:
    plan.problems.append("pos_embed: a RoPE-ViT with an absolute position embedding (`_ape`), "
                         "which mFormerV1 lacks; use the rope_mixed model without it")
  fshape = (2, len(blocks), heads * p) if layout == "official" else (2, len(blocks), heads, p)
  e = plan.entries
  e.append(_copy(("cls_token_1",), "cls_token", tshapes[("cls_token_1",)]))
  e += _ln(("norm_1",), "norm", tshapes)
  for i in range(n):
    k, o = f"blocks.{i}", ("stage3", "blocks", i)
    e += _ln((*o, "norm1"), f"{k}.norm1", tshapes) + _ln((*o, "norm2"), f"{k}.norm2", tshapes)
    e += _kb((*o, "attn", "qkv"), f"{k}.attn.qkv", tshapes, _DENSE)  # rows [q | k | v]
    e += _kb((*o, "mlp", "fc1"), f"{k}.mlp.fc1", tshapes, _DENSE)
    for ours, theirs, gamma in ((("attn", "proj"), "attn.proj", "gamma_1"),
                                (("mlp", "fc2"), "mlp.fc2", "gamma_2")):
      kshape = tshapes[(*o, *ours, "kernel")]
      e.append(Entry((*o, *ours, "kernel"), ((f"{k}.{theirs}.weight", kshape[::-1]),
                                             (f"{k}.{gamma}", (kshape[1],))),
                     _fold_kernel, folded=(f"{k}.{gamma}",)))
      e.append(Entry((*o, *ours, "bias"), ((f"{k}.{theirs}.bias", (kshape[1],)),
                                           (f"{k}.{gamma}", (kshape[1],))),
                     lambda b, g: b * g, folded=(f"{k}.{gamma}",)))
    e.append(Entry((*o, "attn", "freqs"), ((fkey, fshape),),
                   lambda f, i=i: f[:, i].reshape(2, heads, p)))
  for i in sorted(blocks - set(range(n))):
    plan.unused[f"blocks.{i}.*"] = f"ViT block {i}: stage 3 has {n} blocks"
  if len(blocks) > n:
    plan.notes.append(f"{fkey}: the slices of blocks {n}..{len(blocks) - 1} are unused")
  return plan


PLANNERS = {"convnext": plan_convnext, "ropevit": plan_ropevit}


# ----------------------------------------------------------------------------- Checking


def check(plan: Plan, sshapes: dict, tshapes: dict) -> dict:
  """The plan's record against the source's keys: mapped / folded / unused / unknown keys,
  missing keys, shape mismatches (all appended to plan.problems)."""
  used, folded, missing, mismatched = set(), set(), [], []
  for entry in plan.entries:
    if entry.target not in tshapes:
      raise RuntimeError(f"pretrained: no target {entry.target}")  # a bug in a planner
    for key, want in entry.sources:
      if key not in sshapes:
        missing.append(f"{key} (expected shape {list(want)})")
      elif tuple(sshapes[key]) != tuple(want):
        mismatched.append(f"{key}: shape {list(sshapes[key])}, expected {list(want)} for "
                          f"{'/'.join(map(str, entry.target))}")
      (folded if key in entry.folded else used).add(key)
  unused = {k for k in sshapes if k not in used | folded
            and any(fnmatch.fnmatchcase(k, pat) for pat in plan.unused)}
  unknown = sorted(set(sshapes) - used - folded - unused)
  for title, items in (("missing keys", sorted(set(missing))),
                       ("shape mismatches", sorted(set(mismatched))),
                       ("unknown keys", [f"{k} (shape {list(sshapes[k])})" for k in unknown])):
    if items:
      plan.problems.append(f"{title} ({len(items)}): " + "; ".join(items[:50])
                           + (f"; ... {len(items) - 50} more" if len(items) > 50 else ""))
  return {"layout": plan.layout, "tensors": len(sshapes),
          "mapped": sorted(used & set(sshapes)), "folded": sorted(folded & set(sshapes)),
          "unused": {pat: why for pat, why in plan.unused.items()
                     if any(fnmatch.fnmatchcase(k, pat) for k in unused)},
          "unused_count": len(unused), "unknown": unknown, "notes": plan.notes,
          "problems": list(plan.problems)}


def apply(plan: Plan, weights: dict) -> dict:
  """{target path: float32 array} of a checked plan's entries whose sources are all present."""
  out = {}
  for entry in plan.entries:
    if all(k in weights and tuple(np.shape(weights[k])) == tuple(w) for k, w in entry.sources):
      out[entry.target] = np.asarray(entry.fn(*[np.asarray(weights[k], np.float32)
                                                for k, _ in entry.sources]), np.float32)
  return out


def target_groups(tshapes: dict, loaded) -> dict:
  """Per top-level module: loaded / random tensors and values."""
  groups = {}
  for path, shape in tshapes.items():
    g = groups.setdefault(path[0], {"loaded": 0, "random": 0, "loaded_values": 0,
                                    "random_values": 0})
    kind = "loaded" if path in loaded else "random"
    g[kind] += 1
    g[f"{kind}_values"] += int(np.prod(shape))
  return groups


# ----------------------------------------------------------------------------- Earlier models


def _key(path) -> str:
  return "/".join(map(str, path))


def plan_checkpoint(sshapes: dict, tshapes: dict, src_maps: dict | None, dst_maps: dict) -> Plan:
  """An earlier mFormerV1 (keys are our '/'-joined unscanned paths) -> this model.

  The backbone must match (missing, unknown or mis-shaped tensors are problems); a metadata
  embedder loads where its component and width match, else it is new; a head loads where its
  classes match, its columns reordered by taxon id when the class maps order them differently
  (by index when the source has no class map), else it is new. `src_maps` / `dst_maps`:
  {task: {class index: taxon id}}.
  """
  plan = Plan("checkpoint", "linnaeus_jax", [], {})
  by_task: dict = {}
  for path in tshapes:
    key, shape = _key(path), tshapes[path]
    if path[0] == "head":
      by_task.setdefault(path[1], []).append(path)
    elif path[0] in ("meta_1", "meta_2"):
      if sshapes.get(key) == tuple(shape):
        plan.entries.append(_copy(path, key, shape))
    else:
      plan.entries.append(_copy(path, key, shape))
  for task, paths in sorted(by_task.items()):
    kernel = ("head", task, "fc", "kernel")
    skernel = sshapes.get(_key(kernel))
    if skernel is None or len(skernel) != 2 or skernel[0] != tshapes[kernel][0]:
      plan.heads[task] = "new: the source has no head for this task"
      continue
    src = (src_maps or {}).get(task)
    dst = dst_maps.get(task)
    n_src, n_dst = skernel[1], tshapes[kernel][1]
    if src is None or dst is None:
      if n_src != n_dst:
        plan.heads[task] = f"new: {n_dst} classes here, {n_src} in the source"
        continue
      perm, how = None, "loaded by class index (the source has no class map)"
    else:
      taxa_src = {taxon: i for i, taxon in src.items()}
      if set(taxa_src) != set(dst.values()):
        shared = len(set(taxa_src) & set(dst.values()))
        plan.heads[task] = (f"new: the classes differ ({n_dst} here, {n_src} in the source, "
                            f"{shared} shared)")
        continue
      perm = np.asarray([taxa_src[dst[i]] for i in range(n_dst)])
      reordered = not np.array_equal(perm, np.arange(n_dst))
      perm = perm if reordered else None
      how = "loaded, reordered by taxon id" if reordered else "loaded (same classes)"
    plan.heads[task] = how
    for path in paths:
      fn = (lambda x, p=perm: x[..., p]) if perm is not None else (lambda x: x)
      plan.entries.append(Entry(path, ((_key(path), sshapes[_key(path)]),), fn))
  mapped = {k for e in plan.entries for k, _ in e.sources}
  for key in sshapes:
    if key in mapped:
      continue
    parts = key.split("/")
    if parts[0] == "head":
      plan.unused["/".join(parts[:2]) + "/*"] = ("the source's head for a task whose classes "
                                                 "differ or that this model lacks")
    elif parts[0] in ("meta_1", "meta_2"):
      plan.unused["/".join(parts[:3]) + ("/*" if len(parts) > 3 else "")] = (
          "the source's metadata embedder for a component this model lacks or sizes differently")
  for task, why in plan.heads.items():
    plan.notes.append(f"head {task}: {why}")
  return plan


def read_checkpoint(spec: str, config) -> dict:
  """An earlier model: {"weights": {our '/'-joined unscanned path: array}, "class_maps"
  ({task: {class index: taxon id}}, None when the source has none), "kind"}.

  `spec`: a training workdir (`DIR`, or `DIR:step`), a bundle (bundle.json), the output folder of
  `tools.convert_torch`, or an original checkpoint file (converted here against `config`'s
  architecture, its class counts taken from the file).
  """
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.inference import bundle, predictor  # pylint: disable=g-import-not-at-top
  path, step = spec, None
  if not os.path.exists(spec) and (m := re.fullmatch(r"(.+):(\d+)", spec)):
    path, step = m.group(1), int(m.group(2))
  try:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "bundle.json")):
      b = bundle.read(path)
      out = dict(kind="bundle", variables=b["variables"], class_maps=b["class_maps"])
    elif os.path.isdir(path) and os.path.isdir(os.path.join(path, "checkpoints")):
      w = predictor.load_workdir(path, step)
      out = dict(kind=f"workdir, step {w['step']}", variables=w["variables"],
                 class_maps=w["class_maps"])
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "conversion.json")):
      out = dict(kind="converted original checkpoint",
                 variables=bundle.load_params(os.path.join(path, "params.npz")), class_maps=None)
    elif os.path.isfile(path):
      src = config_lib.with_changes(config, {  # classes taken from the file
          f"model.classification.heads.{t}.num_classes": 0 for t in config.data.task_keys_h5})
      variables, _, _ = convert_torch.convert_with_report(read_weights(path), src)
      out = dict(kind="original checkpoint", variables=variables, class_maps=None)
    else:
      raise InitError(f"model.init.checkpoint={spec}: not a workdir (no checkpoints/), a bundle "
                      "(no bundle.json), a converted checkpoint (no conversion.json) or a file")
  except (OSError, ValueError, KeyError) as e:  # BundleError, ConversionError, TorchFileError
    if isinstance(e, InitError):
      raise
    raise InitError(f"model.init.checkpoint={spec}: {type(e).__name__}: {e}") from None
  flat = convert_torch._flatten(out.pop("variables").get("params", {}))  # pylint: disable=protected-access
  flat = convert_torch._unstack_blocks(flat)  # pylint: disable=protected-access
  out["weights"] = {_key(p): v for p, v in flat.items()}
  return out


# ----------------------------------------------------------------------------- Entry point


def sha256(path: str) -> str | None:
  return convert_torch.sha256(path) if os.path.isfile(path) else None


def source_normalization(config, loaded=None) -> tuple[tuple, tuple, str] | None:
  """(mean, std, why) the configured sources expect, or None (no source / none recorded);
  `loaded`: the names of the sources that loaded weights (default: every configured one)."""
  init = config.model.init
  on = lambda name: bool(init[name]) and (loaded is None or name in loaded)
  if on("convnext") or on("ropevit"):
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std (ConvNeXt / RoPE-ViT training)"
  if on("checkpoint"):
    src = read_checkpoint_config(init.checkpoint)
    if src is not None and len(src.data.image_mean):
      return tuple(src.data.image_mean), tuple(src.data.image_std), "the source model's"
  return None


def read_checkpoint_config(spec: str):
  """The config.json next to an earlier model (None for an original checkpoint file)."""
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.inference import bundle  # pylint: disable=g-import-not-at-top
  path = spec if os.path.exists(spec) else spec.rsplit(":", 1)[0]
  if not os.path.isdir(path):
    return None
  try:
    return config_lib.with_defaults(bundle.read_config(os.path.join(path, "config.json")))
  except (OSError, ValueError) as e:
    raise InitError(f"model.init.checkpoint={spec}: {e}") from None


def normalization(config, loaded=None) -> tuple[dict, str | None]:
  """({data.image_mean/std: the sources'}, what was done, for the report) when
  model.init.match_normalization and they are unset, of the sources in `loaded` only when given
  (`loaded_sources`); ({}, None) otherwise."""
  if not config.model.init.match_normalization or len(config.data.image_mean):
    return {}, None
  found = source_normalization(config, loaded)
  if found is None:
    return {}, None
  mean, std, why = found
  return ({"data.image_mean": tuple(mean), "data.image_std": tuple(std)},
          f"data.image_mean/std set to {why}: {list(mean)} / {list(std)}")


def enabled(config) -> bool:
  i = config.model.init
  return bool(i.convnext or i.ropevit or i.checkpoint)


def load(config, class_to_idx: dict) -> tuple[dict, dict]:
  """({unscanned target path: float32 array}, report) for config.model.init; raises InitError
  with every problem of every source (unless allow_partial). `class_to_idx`: this run's
  {task: {taxon id | "null": class index}} (the dataset's)."""
  from linnaeus_jax.tools.convert_torch import _abstract_params, _flatten  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  init = config.model.init
  unscanned = config_lib.with_changes(config, {"model.scan_blocks": False})
  tshapes = {p: tuple(int(n) for n in v.shape)
             for p, v in _flatten(_abstract_params(unscanned)[0]).items()}
  loaded, sources, problems = {}, {}, []
  for name in ("convnext", "ropevit", "checkpoint"):
    path = init[name]
    if not path:
      continue
    try:
      if name == "checkpoint":
        src = read_checkpoint(path, config)
        weights, shapes = src["weights"], _shapes(src["weights"])
        maps = {t: {int(i): 0 if k == "null" else int(k) for k, i in m.items()}
                for t, m in class_to_idx.items()}
        plan = plan_checkpoint(shapes, tshapes, src["class_maps"], maps)
        plan.layout = src["kind"]
      else:
        weights = read_weights(path)
        shapes = _shapes(weights)
        plan = PLANNERS[name](shapes, tshapes)
    except InitError as e:
      problems.append(f"model.init.{name}: {e}")
      continue
    record = check(plan, shapes, tshapes)
    record.update(path=os.path.abspath(path.rsplit(":", 1)[0] if not os.path.exists(path)
                                       else path), sha256=sha256(path))
    if name == "checkpoint":
      record["heads"] = plan.heads
    sources[name] = record
    problems += [f"model.init.{name}={path}: {p}" for p in record["problems"]]
    arrays = apply(plan, weights)
    record["loaded_count"] = len(arrays)
    for target in set(arrays) & set(loaded):
      problems.append(f"{_key(target)} is loaded by two sources")
    loaded.update(arrays)
  if not loaded:  # allow_partial or not: a start from nothing is not what was asked for
    raise InitError("model.init: no weights were loaded from any source"
                    + "".join(f"\n  {p}" for p in problems))
  if problems and not init.allow_partial:
    raise InitError("the initial weights (model.init) do not fit the model:\n  "
                    + "\n  ".join(problems) + "\n(model.init.allow_partial=True loads what fits "
                    "and reports the rest)")
  report = {"sources": sources, "targets": target_groups(tshapes, loaded),
            "random": sorted(_key(p) for p in tshapes if p not in loaded),
            "problems": problems}
  return loaded, report


def summary(report: dict) -> str:
  """The report on one screen."""
  lines = []
  for name, s in report["sources"].items():
    lines.append(f"init from {name} ({s['layout']}) {s['path']}: {len(s['mapped'])} tensors "
                 f"mapped, {len(s['folded'])} folded, {s['unused_count']} unused"
                 + (f", {len(s['unknown'])} unknown" if s["unknown"] else ""))
    lines += [f"  unused {pat}: {why}" for pat, why in s["unused"].items()]
    lines += [f"  {note}" for note in s["notes"]]
  rows = [(g, v["loaded"], v["random"], v["loaded_values"] + v["random_values"])
          for g, v in report["targets"].items()]
  lines.append(f"  {'module':<14} {'loaded':>7} {'new':>5} {'values':>13}")
  lines += [f"  {g:<14} {a:>7} {b:>5} {n:>13,}" for g, a, b, n in rows]
  done = sum(v["loaded_values"] for v in report["targets"].values())
  total = sum(v["loaded_values"] + v["random_values"] for v in report["targets"].values())
  lines.append(f"  {done:,} of {total:,} parameter values loaded ({100 * done / total:.1f}%); "
               "the optimizer starts fresh")
  lines += [f"  problem: {p}" for p in report["problems"]]
  if report.get("normalization"):
    lines.append(f"  {report['normalization']}")
  return "\n".join(lines)


def note_resume(workdir: str, step: int) -> None:
  """Adds to DIR's report that a later start resumed from `step` instead of applying init."""
  path = os.path.join(workdir, "assets", "init_report.json")
  report = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
  report.setdefault("resumed", []).append(
      {"step": step, "note": "model.init not applied: the run resumed from its own checkpoint"})
  write_report(workdir, report)


def loaded_sources(report: dict) -> list[str]:
  """The names of the sources of an init report that loaded at least one tensor."""
  return [n for n, s in report.get("sources", {}).items() if s.get("loaded_count", 1) > 0]


def read_report(workdir: str) -> dict | None:
  """DIR/assets/init_report.json, or None when the run has none."""
  path = os.path.join(workdir, "assets", "init_report.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_report(workdir: str, report: dict) -> None:
  path = os.path.join(workdir, "assets", "init_report.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)


def place(params, loaded: dict, scan: bool):
  """`params` (a fresh train state's) with the loaded arrays put in, sharded as they are; a
  scanned stage's rows are replaced one by one where only some of its blocks were loaded."""
  import jax  # pylint: disable=g-import-not-at-top
  direct, rows = {}, {}
  for path, value in loaded.items():
    if scan and path[0] in convert_torch._STAGES and path[1] == "blocks":  # pylint: disable=protected-access
      rows.setdefault((path[0], "blocks", *path[3:]), {})[path[2]] = value
    else:
      direct[path] = value

  def put(keys, leaf):
    path = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keys)
    if path in rows and len(rows[path]) < leaf.shape[0]:
      for i, row in rows[path].items():
        leaf = leaf.at[i].set(row)
      return leaf
    if path in rows:
      value = np.stack([rows[path][i] for i in range(leaf.shape[0])])
    elif path in direct:
      value = direct[path]
    else:
      return leaf
    if value.shape != leaf.shape:
      raise RuntimeError(f"pretrained: {_key(path)} has shape {value.shape}, the model "
                         f"{leaf.shape}")
    value = value.astype(leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx: value[idx])
  return jax.tree_util.tree_map_with_path(put, params)
