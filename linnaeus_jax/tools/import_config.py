"""Turns an original linnaeus YAML experiment config into a linnaeus_jax Python config file.

    python -m linnaeus_jax.tools.import_config --yaml=EXPERIMENT.yaml [--out=configs/x.py] \
        [--config_dir=ORIGINAL_REPO_ROOT]

Includes. `MODEL.BASE: [arch.yaml, ...]` is resolved as the original's `load_model_base_config`
intends: each file's `MODEL` section (or the whole file) goes underneath, in list order, and the
experiment's own `MODEL` keys override it recursively, so defaults < arch < experiment. (The
original overlays its whole default `MODEL` node, so there an arch value of a key its defaults
also define, e.g. mFormerV1_sm's DROP_PATH_RATE 0.2, silently becomes the default 0.1; we follow
the intent.) The top-level `BASE: [...]` list appears in the original's docs but no code of it
resolves it; it is supported here anyway: its files are merged in list order underneath the file
itself (lower precedence). Relative include paths are joined to `config_dir` (the original's
$CONFIG_DIR, its repo root), or else to the first ancestor folder of the including YAML in which
the path exists. String values are decoded like YACS does (`'5e-5'` -> 5e-05, `'None'` -> None).

Mapping. Our keys are the original's lower-cased (`DATA.H5.LABELS_PATH` -> `data.h5.labels_path`),
data names keep their case (heads, metadata components). A few keys are renamed or converted
(`RULES`: e.g. `MODEL.TYPE` -> `model.name`; `DATA.BATCH_SIZE`, per GPU and per micro-batch there,
x `TRAIN.ACCUMULATION_STEPS` -> the global `data.batch_size`, one GPU assumed). Declared
`MODEL.CLASSIFICATION.HEADS` replace our four default heads (the original has none by default);
metadata components are added to ours; both from their templates. `None` means
"unset" in the original and keeps our default (our unset sentinels). Keys the original accepts
but never uses (`DEAD`, each with the reason) are reported as `ignored`, with one warning;
every other key without a counterpart is `unmapped`, with its value. Keys absent from the YAML
take OUR defaults, which differ from the original's in a few places (e.g.
loss.grad_weighting.task.type static vs gradnorm, schedule.mix.prob.enabled; docs/design.md).
"""

from __future__ import annotations

import ast
import fnmatch
import keyword
import os
import pprint
import textwrap

import ml_collections
import yaml
from absl import flags, logging

from linnaeus_jax import cli
from linnaeus_jax import config as config_lib

ConfigError = config_lib.ConfigError
WIDTH = 100
UNSET = "None: unset, our default"

# Dead in the original: accepted and ignored (why, in the value).
_NOT_READ = "not read by the original's mFormerV0/V1"
DEAD = {
    "MODEL.AGGREGATION.*": _NOT_READ, "MODEL.NORMALIZATION.*": _NOT_READ,
    "MODEL.FEATURE_RESOLVER.*": _NOT_READ, "MODEL.ATTENTION_MECHANISM.*": _NOT_READ,
    "MODEL.EXTRA_TOKEN_NUM": "the original overrides it with 1 + the metadata components",
    "MODEL.WINDOW_SIZE": "only in the original's docs; no model reads it",
    "MODEL.CONVNEXT_STAGES.DEPTHS[2:]": "mFormerV1 builds only the first two ConvNeXt stages",
    "LOSS.GRAD_WEIGHTING.TASK.INIT_STRATEGY": "dead code in the original's GradNorm",
    "TRAIN.PRESERVE_CHECKPOINT_SCHEDULE": "never read by the original",
    "LR_SCHEDULER.REFERENCE_LR": "only logged by the original",
    "LR_SCHEDULER.DECAY_FRACTION": "resolved after the original's scheduler is built: no effect",
    "SCHEDULE.METRICS.CONSOLE_FRACTION": "ignored by the original",
    "SCHEDULE.METRICS.WANDB_FRACTION": "ignored by the original",
    "SCHEDULE.MIX.LEVEL_SWITCH_*": "level switching is disabled in the original (group_levels[0])",
    "DATA.USE_VECTORIZED_PROCESSOR": "legacy; never read by the original",
    "DATA.PIN_MEMORY": "no effect with the original's own loader",
    "DATA.NUM_WORKERS": "no effect with the original's own loader",
    "DATA.HYBRID.VERIFY_IMAGES.LOG_MISSING": "not wired in the original",
}

# Why some keys have no counterpart (shown next to them; fnmatch patterns).
NOTES = {
    "EXPERIMENT.*": "run naming / W&B: the run folder is --workdir here",
    "ENV.*": "the original's environment paths: --workdir and data.* paths here",
    "DEBUG.*": "logging switches",
    "MODEL.ATTN_DROP_RATE": "no attention dropout here (0.0 in every shipped arch)",
    "MODEL.PRETRAINED*": "pretrained initialisation is not a config key here",
    "MODEL.USE_FLASH_ATTN": "kernel choice (model.attention_impl); flash-trained checkpoints need "
                            "model.attn_scale='inv_head_dim'",
    "MODEL.META_DIMS": "the original's legacy (and broken) metadata path, unsupported: use "
                       "data.meta.components",
    "MODEL.FIND_UNUSED_PARAMETERS": "DDP option",
    "MODEL.CLASSIFICATION.HEADS.*.USE_BIAS": "heads always have a bias here",
    "TRAIN.AMP_OPT_LEVEL": "precision is model.dtype here",
    "TRAIN.GRADIENT_CHECKPOINTING.*": "see model.remat",
    "OPTIMIZER.PARAMETER_GROUPS.*": "torch parameter-name FILTER trees: define groups with filter "
                                    "strings (docs/optimization.md)",
    "LR_SCHEDULER.PARAMETER_GROUPS.*": "per-group LR is optimizer.parameter_groups.*.lr_multiplier",
    "DATA.SAMPLER.GROUPED_MODE": "the pair sampler trains every sample "
                                 "(docs/design.md#pair-sampler-trains-every-sample)",
    "SCHEDULE.MIX.USE_GPU": "mixing runs on the device here",
    "SCHEDULE.METRICS.LR_INTERVAL": "the LR is logged every schedule.metrics.tensorboard_interval",
    "SCHEDULE.METRICS.PIPELINE_INTERVAL": "the original loader's queue metrics",
    "DATA.DATASET.*": "descriptive (CLADE named the original's bundle source)",
}


# --- loading and includes ------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConfigError(f"YAML file not found: {path}")
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConfigError(f"invalid YAML {path}: {e}") from e
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
  return data


def _find_include(rel: str, including: str, config_dir: str | None) -> str:
  """The include's path: absolute, joined to config_dir, or under the first ancestor of the
  including YAML's folder in which it exists."""
  if os.path.isabs(rel):
    where, tried = "that path", [rel]
  elif config_dir is not None:
    where, tried = f"config_dir {config_dir}", [os.path.join(config_dir, rel)]
  else:
    where, folder, tried = "the including file's folder and its ancestors", including, []
    while os.path.dirname(folder) != folder:
      folder = os.path.dirname(folder)
      tried.append(os.path.join(folder, rel))
  found = next((p for p in tried if os.path.isfile(p)), None)
  if found is None:
    shown = ", ".join(tried[:3]) + (f", ... ({len(tried)} places)" if len(tried) > 3 else "")
    raise ConfigError(f"include {rel!r} (from {including}) not found; looked in {where}: {shown}")
  return os.path.abspath(found)


def _as_list(value, key: str, path: str) -> list[str]:
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple, type(None))):
    raise ConfigError(f"{path}: {key} must be a list of YAML paths, got {value!r}")
  return [str(v) for v in value or [] if str(v).strip()]


def merge(low: dict, high: dict) -> dict:
  """`high` over `low`, recursively for nested mappings (the original's merge_configs)."""
  out = dict(low)
  for key, value in high.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = merge(out[key], value)
    else:
      out[key] = value
  return out


def resolve(path: str, config_dir: str | None = None, includes: list | None = None,
            _stack: tuple = ()) -> dict:
  """The YAML at `path` with its top-level BASE and its MODEL.BASE includes merged in."""
  path = os.path.abspath(path)
  if path in _stack:
    raise ConfigError(f"include cycle: {' -> '.join(_stack + (path,))}")
  includes = [] if includes is None else includes
  raw = _read_yaml(path)
  out = {}
  for rel in _as_list(raw.pop("BASE", None), "BASE", path):
    inc = _find_include(rel, path, config_dir)
    includes.append(inc)
    out = merge(out, resolve(inc, config_dir, includes, _stack + (path,)))
  out = merge(out, raw)
  model = out.get("MODEL")
  if isinstance(model, dict) and "BASE" in model:
    model = dict(model)
    arch = {}
    for rel in _as_list(model.pop("BASE"), "MODEL.BASE", path):
      inc = _find_include(rel, path, config_dir)
      includes.append(inc)
      base = resolve(inc, config_dir, includes, _stack + (path,))
      arch = merge(arch, base["MODEL"] if isinstance(base.get("MODEL"), dict) else base)
    out["MODEL"] = merge(arch, model)
  return out


# --- mapping ---------------------------------------------------------------------------------


def _decode(value):
  """YACS's `_decode_cfg_value`: a string that is a Python literal becomes that literal."""
  if not isinstance(value, str):
    return value
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return value


def _leaves(tree: dict, path: tuple = ()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, path + (str(key),))
    else:
      yield path + (str(key),), _decode(value)


def _get(tree: dict, dotted: str, default=None):
  node = tree
  for key in dotted.split("."):
    if not isinstance(node, dict) or key not in node:
      return default
    node = node[key]
  return _decode(node)


def _set(value, target: str, note: str = ""):
  return [("set", target, value, note)]


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _batch_size(v, tree, _):
  k = _get(tree, "TRAIN.ACCUMULATION_STEPS", 1)
  k = max(1, k) if _number(k) else 1
  if not _number(v):
    return _set(v, "data.batch_size")
  note = (f"DATA.BATCH_SIZE {v} (per GPU) x TRAIN.ACCUMULATION_STEPS {k}; one GPU assumed: "
          "x the number of GPUs the original ran on" if k > 1 else
          "DATA.BATCH_SIZE was per GPU: x the number of GPUs the original ran on")
  return _set(v * k, "data.batch_size", note)


def _img_size(v, tree, _):
  data = _get(tree, "DATA.IMG_SIZE")
  if data is not None and data != v:
    return [("unmapped", f"differs from DATA.IMG_SIZE {data}, which data.img_size takes")]
  return _set(v, "data.img_size")


def _convnext_depths(v, *_):
  if not isinstance(v, list) or len(v) <= 2:
    return _set(v, "model.convnext_stages.depths")
  return (_set(v[:2], "model.convnext_stages.depths")
          + [("ignored", "MODEL.CONVNEXT_STAGES.DEPTHS[2:]", v[2:])])


def _task_type(v, tree, _):
  """The original runs GradNorm iff TYPE (default gradnorm there) is gradnorm and
  GRADNORM_ENABLED (default True) is not False."""
  t = _get(tree, "LOSS.GRAD_WEIGHTING.TASK.TYPE", "gradnorm")
  on = _get(tree, "LOSS.GRAD_WEIGHTING.TASK.GRADNORM_ENABLED", True)
  if t == "gradnorm" and on is False:
    return _set("static", "loss.grad_weighting.task.type", "GRADNORM_ENABLED False")
  return _set(t, "loss.grad_weighting.task.type")


def _per_task(v, _, dotted):
  """The original takes a per-task list or one value; ours is one value for every task."""
  target = dotted.lower()
  if isinstance(v, list):
    if not v or any(x != v[0] for x in v):
      return [("unmapped", f"per-task values; {target} takes one for every task")]
    return _set(v[0], target)
  return _set(v, target)


def _at_most(limit, replacement, note):
  """Values <= limit become `replacement` (the original's "unset" or "unlimited")."""
  def rule(v, _, dotted):
    hit = _number(v) and v <= limit
    return _set(replacement if hit else v, dotted.lower(), note if hit else "")
  return rule


def _rename(target, note=""):
  return lambda v, *_: _set(v, target, note)


# Renamed or converted keys: original path (fnmatch pattern) -> rule(value, tree, path), which
# returns outcomes ("set", our path, value, note) | ("ignored", key, value) | ("unmapped", why).
RULES = {
    "MODEL.TYPE": _rename("model.name"),
    "MODEL.NAME": lambda *_: [("unmapped", "a label; the architecture is MODEL.TYPE")],
    "MODEL.IMG_SIZE": _img_size,
    "MODEL.CONVNEXT_STAGES.DEPTHS": _convnext_depths,
    "DATA.BATCH_SIZE": _batch_size,
    "TRAIN.ACCUMULATION_STEPS": _at_most(0, 1, "0 meant 1"),
    "DATA.HYBRID.ALLOW_MISSING_IMAGES": lambda v, *_: (
        _set("placeholder" if v else "error", "data.hybrid.missing_image_policy")
        if isinstance(v, bool) else [("unmapped", "expected a bool")]),
    "DATA.HYBRID.VERIFY_IMAGES.MAX_MISSING_RATIO": _at_most(0, 1.0, "0 meant unlimited"),
    "DATA.HYBRID.VERIFY_IMAGES.MAX_MISSING_COUNT": _at_most(0, -1, "0 meant unlimited"),
    "LOSS.GRAD_WEIGHTING.TASK.TYPE": _task_type,
    "LOSS.GRAD_WEIGHTING.TASK.GRADNORM_ENABLED": _task_type,
    "LOSS.GRAD_WEIGHTING.TASK.GRADNORM_WARMUP_STEPS": _rename(
        "loss.grad_weighting.task.warmup_steps"),
    "LOSS.GRAD_WEIGHTING.TASK.EXCLUDE_PATTERNS": _rename("loss.grad_weighting.task.exclude"),
    **{f"LOSS.GRAD_WEIGHTING.CLASS.{k}": _per_task
       for k in ("METHOD", "CAP", "SMOOTHING_FACTOR", "BASE", "LOG_BASE")},
    # The original's schedule checks count an interval fraction as set only when > 0 (its
    # resolver would make 0.0 an every-step interval); ours: negative = unset.
    "SCHEDULE.*INTERVAL_FRACTION": _at_most(0, -1.0, "<= 0 meant unset"),
    "SCHEDULE.CHECKPOINT.KEEP_LAST_N": _at_most(0, 1, "0 kept only latest.pth: 1 here"),
    "SCHEDULE.METRICS.WANDB_INTERVAL": _rename("schedule.metrics.tensorboard_interval",
                                               "the W&B logging interval"),
    "TRAIN.EARLY_STOP.PATIENCE_STEPS": _rename(
        "train.early_stop.patience_evals", "the original counted epoch-end checks, ours counts "
        "validations"),
}


def _match(dotted: str, table: dict):
  return next((v for k, v in table.items() if fnmatch.fnmatchcase(dotted, k)), None)


def _coerce(value, default):
  """`value` with the type of our `default`; TypeError naming the expected type otherwise."""
  if isinstance(default, ml_collections.ConfigDict):
    raise TypeError("expected a mapping")
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    raise TypeError("expected a bool")
  if isinstance(default, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise TypeError("expected an int")
  if isinstance(default, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise TypeError("expected a number")
  if isinstance(default, str):
    if isinstance(value, str):
      return value
    raise TypeError("expected a string")
  if isinstance(default, (list, tuple)):
    if not isinstance(value, (list, tuple)):
      raise TypeError("expected a list")
    if default and all(isinstance(x, float) for x in default):
      value = [_coerce(x, 0.0) for x in value]
    return config_lib.tuples(value)  # (nested) tuples, as every sequence of ours
  return value


def _target_node(config, target: str):
  """(parent ConfigDict, key, our default) of our dotted `target`, None if it does not exist. A
  missing open-subtree entry (head, component) is added from its template when the target is one
  of the template's keys."""
  keys, node, path = target.split("."), config, ""
  for i, key in enumerate(keys[:-1]):
    if path in config_lib.OPEN_SUBTREES and key not in node:
      entry = config_lib.TEMPLATES[config_lib.OPEN_SUBTREES[path]]()
      if len(keys) != i + 2 or keys[-1] not in entry:
        return None
      node[key] = entry
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return None
    node, path = node[key], f"{path}.{key}" if path else key
  if not isinstance(node, ml_collections.ConfigDict) or keys[-1] not in node:
    return None
  return node, keys[-1], node[keys[-1]]


def _our_path(path: tuple) -> str:
  """Lower-cased dotted path; the entry name right under an open subtree keeps its case."""
  out = []
  for key in path:
    out.append(key if ".".join(out) in config_lib.OPEN_SUBTREES else key.lower())
  return ".".join(out)


def _short(text: str, width: int) -> str:
  return text if len(text) <= width else text[:max(width - 3, 0)] + "..."


def from_yaml(path: str, config_dir: str | None = None):
  """(config, report) for the original YAML at `path`. report: mapped [{key, to, value, note}],
  ignored / unmapped [{key, value, note}], problems (our validation), includes."""
  includes: list[str] = []
  tree = resolve(path, config_dir, includes)
  config = config_lib.base_config()
  report = {"source": os.path.abspath(path), "includes": includes, "mapped": [], "ignored": [],
            "unmapped": [], "problems": []}
  heads = _get(tree, "MODEL.CLASSIFICATION.HEADS")
  if isinstance(heads, dict) and heads:  # the original's heads are exactly those declared
    config.model.classification.heads = {str(t): config_lib.head_template().to_dict()
                                         for t in heads}
  for keys, value in _leaves(tree):
    dotted = ".".join(keys)
    dead = _match(dotted, DEAD)
    if dead is not None:
      report["ignored"].append(dict(key=dotted, value=value, note=dead))
      continue
    rule = _match(dotted, RULES)
    outcomes = (rule(value, tree, dotted) if rule is not None
                else [("set", _our_path(keys), value, "")])
    for outcome in outcomes:
      if outcome[0] == "ignored":
        report["ignored"].append(dict(key=outcome[1], value=outcome[2], note=DEAD[outcome[1]]))
        continue
      if outcome[0] == "unmapped":
        report["unmapped"].append(dict(key=dotted, value=value, note=outcome[1]))
        continue
      _, target, new, note = outcome
      found = _target_node(config, target)
      if found is None:
        report["unmapped"].append(dict(key=dotted, value=value, note=_match(dotted, NOTES) or ""))
        continue
      node, key, default = found
      if new is None:  # unset in the original: keep our default (our unset value)
        new, note = (default.to_dict() if isinstance(default, ml_collections.ConfigDict)
                     else default), UNSET
      else:
        try:
          node[key] = _coerce(new, default)
        except TypeError as e:
          report["unmapped"].append(dict(key=dotted, value=value, note=f"{target}: {e}"))
          continue
        new = node[key]
      report["mapped"].append(dict(key=dotted, to=target, value=new, note=note))
  if report["ignored"]:
    logging.warning("ignored keys (dead in the original): %s",
                    ", ".join(e["key"] for e in report["ignored"]))
  try:
    config_lib.validate(config, need_data=False)
  except ConfigError as e:
    lines = str(e).splitlines()
    report["problems"] = [ln.strip() for ln in lines[1:]] if len(lines) > 1 else lines
  except Exception as e:  # pylint: disable=broad-except  # a validator bug must not hide the rest
    report["problems"] = [f"validate() failed: {type(e).__name__}: {e}"]
  return config, report


# --- writing ---------------------------------------------------------------------------------


def _ref(path: tuple) -> str:
  out = "c"
  for key in path:
    out += f".{key}" if key.isidentifier() and not keyword.iskeyword(key) else f"[{key!r}]"
  return out


def _assign(path: tuple, value) -> str:
  """`c.<path> = value`, the value wrapped by pprint when the line would pass WIDTH (2-space
  indented in get_config)."""
  lhs = f"{_ref(path)} = "
  text = repr(value)
  if len(lhs) + len(text) + 2 > WIDTH:
    text = pprint.pformat(value, width=WIDTH - 2 - len(lhs)).replace("\n", "\n  " + " " * len(lhs))
  return lhs + text


def _diff(config, base, path: tuple = ()) -> list[tuple[tuple, str]]:
  """(our path, Python statement) for every value of `config` that differs from `base`."""
  out = []
  where = ".".join(path)
  for key in base.keys():
    if key not in config:
      out.append((path + (key,), f"del {_ref(path)}[{key!r}]"))
  for key in config.keys():
    value, p = config[key], path + (key,)
    if key not in base:
      if where in config_lib.OPEN_SUBTREES:
        kind = config_lib.OPEN_SUBTREES[where]
        out.append((p, f"{_ref(p)} = config_lib.{kind}_template()"))
        out += _diff(value, config_lib.TEMPLATES[kind](), p)
      else:
        out.append((p, _assign(p, value)))
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        base[key], ml_collections.ConfigDict):
      out += _diff(value, base[key], p)
    elif value != base[key] or type(value) is not type(base[key]):
      out.append((p, _assign(p, value.to_dict() if hasattr(value, "to_dict") else value)))
  return out


def _entry_lines(entries: list[dict], prefix: str, width: int | None = None) -> list[str]:
  """`KEY = value  (note)` per entry; a note shared with the line above is not repeated."""
  lines, last = [], None
  for e in entries:
    note = f"  ({e['note']})" if e["note"] and e["note"] != last else ""
    line, last = f"{prefix}{e['key']} = {e['value']!r}{note}", e["note"]
    lines.append(_short(line, width) if width else line)
  return lines


def _comment_list(title: str, entries: list[dict]) -> list[str]:
  return [f"# {title}:"] + _entry_lines(entries, "#   ", WIDTH) if entries else []


def to_python(config, report) -> str:
  """A config file: get_config() = base_config() plus the values that differ, by section."""
  notes = {}
  for e in report["mapped"]:
    if e["note"] and e["note"] != UNSET:
      notes.setdefault(e["to"], []).append(e["note"])
  head = ["# Imported by linnaeus_jax.tools.import_config from", f"#   {report['source']}"]
  if report["includes"]:
    head += ["# with the includes"] + [f"#   {inc}" for inc in report["includes"]]
  head += [f"# {len(report['mapped'])} keys mapped; values equal to our defaults are not "
           "repeated below."]
  head += _comment_list("Unmapped (no counterpart here)", report["unmapped"])
  head += _comment_list("Ignored (dead in the original)", report["ignored"])
  if report["problems"]:
    head += ["# Validation problems (need_data=False):"]
    head += [_short(f"#   {p}", WIDTH) for p in report["problems"]]
  body, section = [], None
  for path, statement in _diff(config, config_lib.base_config()):
    if path[0] != section:
      section = path[0]
      body += ["", f"  # {section}"] if body else [f"  # {section}"]
    for note in notes.get(".".join(path), []):
      body += textwrap.wrap(note, WIDTH - 4, initial_indent="  # ", subsequent_indent="  #   ")
    body.append(f"  {statement}")
  lines = head + ["", "from linnaeus_jax import config as config_lib", "", "",
                  "def get_config():", "  c = config_lib.base_config()"] + body + ["  return c"]
  return "\n".join(lines) + "\n"


def summary(report) -> str:
  """The CLI's summary: counts, ignored keys, unmapped keys with values, validation problems."""
  lines = [f"source: {report['source']}"] + [f"include: {i}" for i in report["includes"]]
  lines.append(f"{len(report['mapped'])} mapped")
  lines.append(f"{len(report['ignored'])} ignored (dead in the original)" +
               (": " + ", ".join(e["key"] for e in report["ignored"]) if report["ignored"]
                else ""))
  lines.append(f"{len(report['unmapped'])} unmapped" + (":" if report["unmapped"] else ""))
  lines += _entry_lines(report["unmapped"], "  ")
  lines.append(f"{len(report['problems'])} validation problems (need_data=False)" +
               (":" if report["problems"] else ""))
  lines += [f"  {p}" for p in report["problems"]]
  return "\n".join(lines)


def main(argv):
  cli.start(argv, logging.ERROR)  # the summary lists the ignored keys
  fl = flags.FLAGS
  config, report = cli.call(from_yaml, fl.yaml, fl.config_dir)
  print(summary(report))
  if fl.out:
    os.makedirs(os.path.dirname(os.path.abspath(fl.out)), exist_ok=True)
    with open(fl.out, "w") as f:
      f.write(to_python(config, report))
    print(f"wrote {fl.out}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the tools can be imported side by side.
  flags.DEFINE_string("yaml", None, "The original's experiment YAML.")
  flags.DEFINE_string("out", None, "The Python config file to write (optional).")
  flags.DEFINE_string("config_dir", None, "Root for relative includes (the original's "
                      "$CONFIG_DIR); default: the first ancestor folder where the path exists.")
  flags.mark_flags_as_required(["yaml"])
  cli.run(main)
