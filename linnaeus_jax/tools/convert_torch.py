"""Converts a state dict of the original PyTorch mFormerV1 (polli-labs/linnaeus) into our params.

    python -m linnaeus_jax.tools.convert_torch --checkpoint=FILE --config=CONFIG.py --out=DIR \
        [--config.data.meta.components.TEMPORAL.dim=4 ...] [--flash_attn_trained] [--overwrite]
    python -m linnaeus_jax.tools.convert_torch --checkpoint=FILE --yaml_config=EXP.yaml --out=DIR

FILE: a `torch.save` zip (a bare state dict such as `pytorch_model.bin`, or a training `.pth`
whose `model` / `state_dict` entry is one; `module.` prefixes are stripped), read without torch
by `torch_pickle.py`, or an `.npz` whose keys are the torch names. CONFIG.py: one of our config
files (`get_config()`, optionally `path.py:arg`), with `--config.x=` overrides as in the other
commands. EXP.yaml: the original's experiment YAML, translated by `tools/import_config.py` (a
separate flag without overrides: config_flags loads Python files only). In Python, `run` and
`load_config` also take a `config.json` written by our training.

Strict (docs/inference.md): every torch tensor is used exactly once and every parameter of the
config's model is filled, or one `ConversionError` lists every missing key, every left-over key
and every shape mismatch. Heads' `num_classes` come from the checkpoint where the config has 0.
The converted config gets the original's numerics: `rope_mode='cos_only'`,
`meta_missing='zeros'`, Linear heads (the original's hierarchical refinement never runs) and,
with --flash_attn_trained, `attn_scale='inv_head_dim'` (its flash-attention scale). DIR gets
`params.npz` (`bundle.save_params`: {"params", "buffers"} as `nnx.to_pure_dict` has them),
`config.json` and `conversion.json` (source, sha256, switches and why, counts, ignored keys);
it appears only once complete.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np

from linnaeus_jax.tools import torch_pickle

# ============================================================================ Name mapping

# Layouts, torch -> ours, ours -> torch, and the torch shape of one of our shapes.
_LAYOUTS = {
    "copy": (lambda x: x, lambda x: x, lambda s: tuple(s)),
    "dense": (lambda x: x.T, lambda x: x.T, lambda s: tuple(s)[::-1]),  # (out,in) <-> (in,out)
    # OIHW <-> HWIO; a depthwise (C,1,7,7) <-> (7,7,1,C) is the same permutation.
    "conv": (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1),
             lambda s: (s[3], s[2], s[0], s[1])),
    "aggregate_w": (lambda x: x.reshape(2), lambda x: x.reshape(1, 2, 1), lambda s: (1, 2, 1)),
    "aggregate_b": (lambda x: x.reshape(()), lambda x: x.reshape(1), lambda s: (1,)),
}
HIERARCHICAL_ATTR = {"ConditionalClassifier": "level_classifiers",
                     "HierarchicalSoftmax": "task_classifiers"}
_STAGES = {"stage0": "stages.0", "stage1": "stages.1", "stage3": "stages.2", "stage4": "stages.3"}


def _ln(t, o):  # layers.LayerNorm wraps an nnx.LayerNorm named `norm`
  return [((*o, "norm", "scale"), f"{t}.weight", "copy"),
          ((*o, "norm", "bias"), f"{t}.bias", "copy")]


def _kernel_bias(t, o, layout="dense"):  # nnx.Linear / nnx.Conv / layers.DepthwiseConv
  return [((*o, "kernel"), f"{t}.weight", layout), ((*o, "bias"), f"{t}.bias", "copy")]


def param_names(config, head_prefixes: dict[str, str]) -> list[tuple[tuple, str, str]]:
  """[(our path in the unscanned layout, torch name, layout)] for `config`'s model.

  `head_prefixes[task]`: the torch module of the task's Dense (`head.<T>.fc`, or the shared
  `head.<T>.level_classifiers.<T>` of a hierarchical head).
  """
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  m = config.model
  out = _kernel_bias("stem.0", ("stem_conv",), "conv") + _ln("stem.1", ("stem_norm",))
  for s in (0, 1):
    for i in range(m.convnext_stages.depths[s]):
      t, o = f"stages.{s}.{i}", (f"stage{s}", "blocks", i)
      out += _kernel_bias(f"{t}.dwconv", (*o, "dwconv"), "conv") + _ln(f"{t}.norm", (*o, "norm"))
      for name in ("pwconv1", "pwconv2"):
        out += _kernel_bias(f"{t}.{name}", (*o, name))
      out.append(((*o, "gamma"), f"{t}.gamma", "copy"))
  for k in range(3):
    t = f"downsample_layers.{k}"
    out += _ln(f"{t}.norm", (f"down{k}", "norm"))
    out += _kernel_bias(f"{t}.conv", (f"down{k}", "conv"), "conv")
  for ours, s in (("stage3", 0), ("stage4", 1)):
    for i in range(m.rope_stages.depths[s]):
      t, o = f"{_STAGES[ours]}.{i}", (ours, "blocks", i)
      out += _ln(f"{t}.norm1", (*o, "norm1")) + _ln(f"{t}.norm2", (*o, "norm2"))
      out += _kernel_bias(f"{t}.attn.qkv", (*o, "attn", "qkv"))  # rows [q | k | v], head-major
      out += _kernel_bias(f"{t}.attn.proj", (*o, "attn", "proj"))
      out.append(((*o, "attn", "freqs"), f"{t}.attn.freqs", "copy"))  # (2, heads, hd/2) both
      for name in ("fc1", "fc2"):
        out += _kernel_bias(f"{t}.mlp.{name}", (*o, "mlp", name))
  for name in ("norm_1", "norm_2", "final_norm"):
    out += _ln(name, (name,))
  out += [(("cls_token_1",), "cls_token_1", "copy"), (("cls_token_2",), "cls_token_2", "copy")]
  for comp, _ in config_lib.enabled_components(config):
    for s in (1, 2):
      t, o = f"meta_{comp.lower()}_head_{s}", (f"meta_{s}", "heads", comp)
      out += _kernel_bias(f"{t}.0", (*o, "fc")) + _ln(f"{t}.2", (*o, "norm"))
      for name in ("w1", "w2"):
        out += _kernel_bias(f"{t}.3.{name}", (*o, "res", name))
      for name in ("norm_fn1", "norm_fn2"):
        out += _ln(f"{t}.3.{name}", (*o, "res", name))
  if not m.only_last_cls:
    for name in ("fc1", "fc2"):
      out += _kernel_bias(f"cl_1_fc.0.{name}", ("cl_1_fc", name))
    out += _ln("cl_1_fc.1", ("cl_1_norm",))
    out += [(("aggregate_w",), "aggregate.weight", "aggregate_w"),
            (("aggregate_b",), "aggregate.bias", "aggregate_b")]
  for task in config.data.task_keys_h5:
    out += _kernel_bias(head_prefixes[task], ("head", task, "fc"))
  return out


def head_prefix(task: str, head_type: str) -> str:
  attr = HIERARCHICAL_ATTR.get(head_type)
  return f"head.{task}.{attr}.{task}" if attr else f"head.{task}.fc"


def _torch_head_types(state_dict, tasks) -> dict[str, str]:
  """Each task's head type as the checkpoint's names show it (Linear when nothing is there)."""
  types = {}
  for t in tasks:
    types[t] = "Linear"
    if f"head.{t}.fc.weight" not in state_dict:
      for head_type, attr in HIERARCHICAL_ATTR.items():
        if any(k.startswith(f"head.{t}.{attr}.") for k in state_dict):
          types[t] = head_type
  return types


# ============================================================================ Converting


class ConversionError(ValueError):
  """The checkpoint does not fit the config's model; lists every problem found."""

  def __init__(self, missing, unexpected, mismatched, other):
    self.missing, self.unexpected, self.mismatched, self.other = (
        missing, unexpected, mismatched, other)
    lines = ["the checkpoint does not match the config's model:"]
    for title, items in (
        ("missing keys", [f"{k} (expected shape {s})" for k, s in missing]),
        ("unexpected keys", [f"{k} (shape {s})" for k, s in unexpected]),
        ("shape mismatches", [f"{k}: checkpoint {a}, expected {b}" for k, a, b in mismatched]),
        ("other problems", other)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {x}" for x in items]
    super().__init__("\n".join(lines))


SWITCH_REASONS = {
    "model.rope_mode": "the original multiplies q and k by cos(angle) instead of rotating them "
                       "(docs/design.md#true-2d-rotary-position-embeddings)",
    "model.meta_missing": "the original embeds a missing component from zeros; it has no learned "
                          "missing-metadata tokens (docs/design.md#metadata-masking-by-validity-flags)",
    "model.attn_scale": "--flash_attn_trained: the original's flash-attention path scaled the "
                        "attention logits by 1/head_dim (docs/design.md#attention-scale)",
    "head_type": "the original's hierarchical refinement never runs (its hmatrix buffers are "
                 "looked up under names that do not exist; "
                 "docs/design.md#hierarchical-heads-that-refine): the head outputs its level's "
                 "Dense exactly, which is our Linear head",
}


def compat_config(config, flash_attn_trained: bool = False):
  """(config with the original's numerics, [switch records]); the input is not modified."""
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  m, records = config.model, []

  def switch(key, node, attr, value, why):
    records.append({"key": key, "value": value, "was": node[attr], "why": why})
    node[attr] = value
  switch("model.rope_mode", m, "rope_mode", "cos_only", SWITCH_REASONS["model.rope_mode"])
  switch("model.meta_missing", m, "meta_missing", "zeros", SWITCH_REASONS["model.meta_missing"])
  switch("model.attn_scale", m, "attn_scale",
         "inv_head_dim" if flash_attn_trained else "rsqrt_head_dim",
         SWITCH_REASONS["model.attn_scale"] if flash_attn_trained else
         "the original's eager attention path scales by 1/sqrt(head_dim) (docs/design.md#attention-scale); pass "
         "--flash_attn_trained for checkpoints trained with flash_attn")
  for t in config.data.task_keys_h5:
    if m.classification.heads[t].type != "Linear":
      switch(f"model.classification.heads.{t}.type", m.classification.heads[t], "type",
             "Linear", SWITCH_REASONS["head_type"])
  return config, records


def _abstract_params(config) -> tuple[dict, dict]:
  """(params, buffers) of `config`'s model as pure dicts of ShapeDtypeStructs."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import models  # pylint: disable=g-import-not-at-top
  _, params, rest = models.abstract(config)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _flatten(tree, prefix=()) -> dict:
  if isinstance(tree, dict):
    return {p: v for k, sub in tree.items() for p, v in _flatten(sub, (*prefix, k)).items()}
  return {prefix: tree}


def _nest(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def _stack_blocks(flat: dict) -> dict:
  """Unscanned (stage, 'blocks', i, ...) leaves -> scanned (stage, 'blocks', ...) stacks."""
  out, groups = {}, {}
  for path, value in flat.items():
    if path[0] in _STAGES and path[1] == "blocks":
      groups.setdefault((path[0], "blocks", *path[3:]), {})[path[2]] = value
    else:
      out[path] = value
  for path, blocks in groups.items():
    out[path] = np.stack([blocks[i] for i in range(len(blocks))])
  return out


def _unstack_blocks(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    if path[0] in _STAGES and path[1] == "blocks" and not isinstance(path[2], int):
      for i, block in enumerate(np.asarray(value)):
        out[(path[0], "blocks", i, *path[2:])] = block
    else:
      out[path] = np.asarray(value)
  return out


def _shape(x) -> tuple:
  return tuple(int(n) for n in x.shape)


def _check_config(state_dict, config, tasks, types, other) -> None:
  """Heads' num_classes (set where 0) and metadata components against the checkpoint."""
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  for t in tasks:
    w = state_dict.get(head_prefix(t, types[t]) + ".weight")
    head = config.model.classification.heads[t]
    if w is None or w.ndim != 2:
      continue
    if head.num_classes == 0:
      head.num_classes = int(w.shape[0])
    elif head.num_classes != w.shape[0]:
      other.append(f"model.classification.heads.{t}.num_classes is {head.num_classes} but the "
                   f"checkpoint's head has {w.shape[0]} classes")
  found = {}
  for key, value in state_dict.items():
    if (mt := re.fullmatch(r"meta_(.+)_head_1\.0\.weight", key)) and value.ndim == 2:
      found[mt.group(1)] = int(value.shape[1])
    elif (mt := re.match(r"meta_(.+)_head_[12]\.", key)):
      found.setdefault(mt.group(1), None)
  ours = {name.lower(): (name, c.dim) for name, c in config_lib.enabled_components(config)}
  for low, dim in sorted(found.items()):
    if low not in ours:
      other.append(f"the checkpoint has metadata component {low!r} (meta_{low}_head_*, dim "
                   f"{dim}) but it is not enabled in data.meta.components (names compare "
                   "lower-cased)")
    elif dim is not None and dim != ours[low][1]:
      other.append(f"data.meta.components.{ours[low][0]}.dim is {ours[low][1]} but the "
                   f"checkpoint's meta_{low}_head_* take {dim} inputs")
  for low, (name, dim) in ours.items():
    if low not in found:
      other.append(f"data.meta.components.{name} (dim {dim}) is enabled but the checkpoint has "
                   f"no meta_{low}_head_* modules")


def _head_extras(state_dict, tasks, types, num_classes, din, ignored, mismatched, other) -> set:
  """Keys of hierarchical heads besides each task's own Dense: the shared level classifiers
  repeated under every hierarchical head (checked equal to the task's own copy, or, for a
  Linear task, dead weights checked for shape) and the `hmatrix_*` buffers (shape only; ours
  come from the taxonomy). Fills `ignored` and returns the keys accounted for."""
  seen = set()
  pairs = {f"{a}_{b}": (num_classes[a], num_classes[b]) for a in tasks for b in tasks if a != b}
  for h in tasks:
    attr = HIERARCHICAL_ATTR.get(types[h])
    if attr is None:
      continue
    for key in [k for k in state_dict if k.startswith(f"head.{h}.hmatrix_")]:
      pair = key[len(f"head.{h}.hmatrix_"):]
      if pair in pairs:
        seen.add(key)
        ignored["buffers"].append(key)
        if _shape(state_dict[key]) != pairs[pair]:
          mismatched.append((key, _shape(state_dict[key]), pairs[pair]))
    for t in tasks:
      if t == h:
        continue
      for leaf in ("weight", "bias"):
        key = f"head.{h}.{attr}.{t}.{leaf}"
        if key not in state_dict:
          continue
        seen.add(key)
        own = state_dict.get(head_prefix(t, types[t]) + f".{leaf}")
        expected = (num_classes[t], din) if leaf == "weight" else (num_classes[t],)
        if _shape(state_dict[key]) != expected:
          mismatched.append((key, _shape(state_dict[key]), expected))
        elif types[t] == "Linear":
          ignored["dead"].append(key)
        elif own is not None and not np.array_equal(own, state_dict[key]):
          other.append(f"{key} differs from {head_prefix(t, types[t])}.{leaf}: the level "
                       "classifiers of hierarchical heads are shared and must be identical")
        else:
          ignored["shared_copies"].append(key)
  return seen


def convert_with_report(state_dict: dict, config, flash_attn_trained: bool = False):
  """(variables, converted config, report) from a torch state dict; raises ConversionError."""
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  sd = {torch_pickle.strip_prefixes(k): np.asarray(v) for k, v in state_dict.items()}
  if len(sd) != len(state_dict):
    raise ConversionError([], [], [], ["keys repeat once module. prefixes are stripped"])
  base = config_lib.with_defaults(config)
  tasks = list(base.data.task_keys_h5)
  types = _torch_head_types(sd, tasks)
  missing, mismatched, other = [], [], []
  _check_config(sd, base, tasks, types, other)
  config, switches = compat_config(base, flash_attn_trained)
  config_lib.validate(config, need_data=False)
  unscanned = config_lib.with_changes(config, {"model.scan_blocks": False})
  expected, _ = _abstract_params(unscanned)
  expected = _flatten(expected)
  entries = param_names(config, {t: head_prefix(t, types[t]) for t in tasks})
  unmapped = set(expected) ^ {path for path, _, _ in entries}
  if unmapped:  # the model and this table disagree: a bug here, not in the checkpoint
    raise RuntimeError(f"convert_torch has no mapping for {sorted(map(str, unmapped))}")
  flat, used, dtypes = {}, set(), {}
  for path, name, layout in entries:
    to_ours, _, torch_shape = _LAYOUTS[layout]
    want = torch_shape(_shape(expected[path]))
    if name not in sd:
      missing.append((name, want))
      continue
    x = sd[name]
    used.add(name)
    if _shape(x) != want:
      mismatched.append((name, _shape(x), want))
    elif not np.issubdtype(x.dtype, np.floating):
      other.append(f"{name} has dtype {x.dtype}, expected a floating-point tensor")
    else:
      dtypes[str(x.dtype)] = dtypes.get(str(x.dtype), 0) + 1
      flat[path] = np.asarray(to_ours(x), np.float32)
  num_classes = {t: config.model.classification.heads[t].num_classes for t in tasks}
  ignored_keys = {"buffers": [], "shared_copies": [], "dead": []}
  ignored = _head_extras(sd, tasks, types, num_classes, config.model.rope_stages.dims[1],
                         ignored_keys, mismatched, other)
  unexpected = [(k, _shape(sd[k])) for k in sd if k not in used and k not in ignored]
  if missing or unexpected or mismatched or other:
    raise ConversionError(missing, unexpected, mismatched, other)
  if config.model.scan_blocks:
    flat = _stack_blocks(flat)
  want_params, buffers = _abstract_params(config)
  want = {p: _shape(v) for p, v in _flatten(want_params).items()}
  if want != {p: _shape(v) for p, v in flat.items()}:
    raise RuntimeError("convert_torch built a parameter tree that differs from the model's")
  if _flatten(buffers):  # buffers (none for Linear heads) are made by the model itself
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from linnaeus_jax import models  # pylint: disable=g-import-not-at-top
    _, _, rest = nnx.split(models.build(config, nnx.Rngs(0)), nnx.Param, ...)
    buffers = {p: np.asarray(v) for p, v in _flatten(nnx.to_pure_dict(rest)).items()}
    buffers = _nest(buffers)
  report = dict(
      switches=switches, ignored=ignored_keys, torch_head_types=types, num_classes=num_classes,
      metadata_components={n: c.dim for n, c in config_lib.enabled_components(config)},
      torch_dtypes=dtypes,
      counts={"torch_tensors": len(sd), "torch_tensors_used": len(used),
              "torch_tensors_ignored": len(ignored), "params": len(flat),
              "param_elements": int(sum(v.size for v in flat.values())),
              "torch_param_elements": int(sum(sd[k].size for k in used))})
  return {"params": _nest(flat), "buffers": buffers}, config, report


def convert(state_dict: dict, config, flash_attn_trained: bool = False):
  """(variables {"params", "buffers"}, converted config) from a torch state dict."""
  variables, config, _ = convert_with_report(state_dict, config, flash_attn_trained)
  return variables, config


def to_torch(variables: dict, config) -> dict[str, np.ndarray]:
  """Inverse of `convert`: the original's state dict for our `variables` under `config`.

  Heads whose type in `config` is hierarchical are written the original's way: the shared
  level classifiers under every hierarchical head and zero `hmatrix_<a>_<b>` buffers named as
  the original names them (coarser task first).
  """
  flat = _unstack_blocks(_flatten(variables.get("params", variables)))
  tasks = list(config.data.task_keys_h5)
  heads = config.model.classification.heads
  out = {}
  for path, name, layout in param_names(config, {t: head_prefix(t, heads[t].type) for t in tasks}):
    out[name] = np.ascontiguousarray(_LAYOUTS[layout][1](flat[path]))
  for h in tasks:
    attr = HIERARCHICAL_ATTR.get(heads[h].type)
    if attr is None:
      continue
    for t in tasks:
      if t != h:
        out[f"head.{h}.{attr}.{t}.weight"] = flat[("head", t, "fc", "kernel")].T.copy()
        out[f"head.{h}.{attr}.{t}.bias"] = flat[("head", t, "fc", "bias")].copy()
    for child, parent in zip(tasks, tasks[1:]):
      shape = (heads[parent].num_classes, heads[child].num_classes)
      out[f"head.{h}.hmatrix_{parent}_{child}"] = np.zeros(shape, np.float32)
  return out


# ============================================================================ Files and CLI


def _override(config, assignment: str) -> None:
  """`a.b.c=value` (value a Python literal, else a string) on an existing key."""
  key, sep, raw = assignment.partition("=")
  if not sep:
    raise ValueError(f"override {assignment!r} is not key=value")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise ValueError(f"override: unknown key {key}")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"override: unknown key {key}")
  node[leaf] = value


def load_config(spec: str, overrides=()):
  """Our config from a config file (`path.py` or `path.py:arg`, `get_config()`), a
  config.json written by training, or the original's experiment YAML (`tools/import_config`),
  completed with the defaults and `overrides` applied."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  import ml_collections  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path, *arg = spec.split(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such config file: {path}")
  if path.endswith((".yaml", ".yml")):
    from linnaeus_jax.tools import import_config  # pylint: disable=g-import-not-at-top
    config, report = import_config.from_yaml(path)
    if report["unmapped"]:
      print(f"warning: {path}: {len(report['unmapped'])} keys not mapped (python -m "
            "linnaeus_jax.tools.import_config lists them)", file=sys.stderr)
  elif path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      try:
        config = ml_collections.ConfigDict(json.load(f))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
  else:
    module_spec = importlib.util.spec_from_file_location("converted_config", path)
    if module_spec is None:
      raise ValueError(f"{path}: not a Python config file or a config.json")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ValueError(f"{path} has no get_config()")
    config = module.get_config(*arg)
    if not isinstance(config, ml_collections.ConfigDict):
      raise ValueError(f"{spec}: get_config() returned {type(config).__name__}, not a ConfigDict")
  config = config_lib.with_defaults(config)
  for assignment in overrides:
    _override(config, assignment)
  return config


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def run(checkpoint: str, config, out_dir: str, *, flash_attn_trained=False, overrides=(),
        overwrite=False, config_source: str | None = None) -> dict:
  """Converts and writes out_dir/{params.npz, config.json, conversion.json}; returns the record.

  `config`: a file for `load_config`, with `overrides` ("key=value") applied to it; or a
  ConfigDict (the command line's `--config`, overrides applied), whose `config_source` and
  `overrides` are only recorded. Everything is written to a temporary sibling folder renamed at
  the end, so a failure leaves no partial out_dir.
  """
  from linnaeus_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.inference import bundle  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty (--overwrite replaces it)")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a folder")
  if isinstance(config, str):
    config_source, config = config, load_config(config, overrides)
  else:
    config = config_lib.with_defaults(config)
  state_dict = torch_pickle.load_torch_checkpoint(checkpoint)
  variables, config, report = convert_with_report(state_dict, config, flash_attn_trained)
  record = {"source": os.path.abspath(checkpoint), "sha256": sha256(checkpoint),
            "config_source": config_source, "overrides": list(overrides),
            "flash_attn_trained": bool(flash_attn_trained), **report}
  record["ignored_why"] = {
      "buffers": "hierarchical heads' hmatrix_* buffers: checked for shape only; ours come from "
                 "the taxonomy (and the original never used them)",
      "shared_copies": "the shared level classifiers repeated under every hierarchical head: "
                       "checked identical to the task's own copy",
      "dead": "shared level classifiers of Linear tasks: never used by the original's forward"}
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    bundle.save_params(os.path.join(tmp, "params.npz"), variables)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      f.write(config_lib.to_json(config))
    with open(os.path.join(tmp, "conversion.json"), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    old = None
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      old = f"{out_dir}.old-{os.getpid()}"
      os.rename(out_dir, old)
    os.replace(tmp, out_dir)  # an empty out_dir is replaced
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return record


FLASH_HELP = (
    "The checkpoint was trained through the original's flash-attention path, which it takes only "
    "when MODEL.USE_FLASH_ATTN is true (every shipped mFormerV1 YAML), flash_attn is installed "
    "and the GPU has SM >= 8 (Ampere/Hopper). That path scaled attention logits by 1/head_dim "
    "instead of 1/sqrt(head_dim) (docs/design.md#attention-scale), so such checkpoints need true "
    "(model.attn_scale='inv_head_dim'). The state dict cannot tell; default false: the eager "
    "path (CPU, older GPUs, no flash_attn).")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  f = flags.FLAGS
  if bool(f.yaml_config) == (f.config is not None):
    print("error: give exactly one of --config and --yaml_config", file=sys.stderr)
    sys.exit(1)
  if f.yaml_config:
    if not f.yaml_config.endswith((".yaml", ".yml")):
      print(f"error: --yaml_config={f.yaml_config} is not a .yaml file (a Python config goes to "
            "--config)", file=sys.stderr)
      sys.exit(1)
    config, source, overrides = f.yaml_config, f.yaml_config, []
  else:
    config, source = f.config, config_flags.get_config_filename(f["config"])
    overrides = [f"{k}={v}" for k, v in config_flags.get_override_values(f["config"]).items()]
  record = cli.call(run, f.checkpoint, config, f.out, flash_attn_trained=f.flash_attn_trained,
                    overrides=overrides, overwrite=f.overwrite, config_source=source)
  c = record["counts"]
  print(f"converted {c['torch_tensors_used']} tensors ({c['param_elements']:,} values) into "
        f"{c['params']} parameters; ignored {c['torch_tensors_ignored']}; wrote {f.out}")
  for s in record["switches"]:
    if s["value"] != s["was"]:
      print(f"  set {s['key']} = {s['value']!r} (was {s['was']!r})")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("checkpoint", None, "torch.save file (state dict or training .pth), or "
                      ".npz keyed by torch names.")
  config_flags.DEFINE_config_file("config", None, "Our config file (get_config(), optionally "
                                  "path.py:arg); --config.x=v overrides.", lock_config=False)
  flags.DEFINE_string("yaml_config", None, "Instead of --config: the original's experiment "
                      "YAML (tools/import_config; no overrides).")
  flags.DEFINE_string("out", None, "Output folder (created; must be absent or empty).")
  flags.DEFINE_bool("flash_attn_trained", False, FLASH_HELP)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out folder.")
  flags.mark_flags_as_required(["checkpoint", "out"])
  cli.run(main)
