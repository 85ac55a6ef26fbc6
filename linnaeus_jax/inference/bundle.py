"""Inference bundles: a folder with everything needed to predict, and nothing of training.

Our layout (docs/inference.md), all paths relative to the folder:
  bundle.json            format, version, source run and step, tasks, compatibility switches
  config.json            the resolved config (model, heads, tasks, partial labels)
  params.npz             parameters and model buffers, keys "params/<path>" and "buffers/<path>"
  preprocessing.json     image size/resize/range/mean/std and the metadata layout (order, dims,
                         encoders)
  taxonomy.json          the class tree (the original's TaxonomyTree v1.0 format)
  class_index_map.json   {task: {"<class index>": taxon id}} (the original's flat format)
  model.jax_exported     the forward pass, `jax.export`-serialised for any batch size
  card.json, README.md   the model card (card.py): model, data, training, final validation of
                         every phase, intended use and limits; GET /info of the server serves it

`read` also accepts an original bundle folder (`inference_config.yaml`, `taxonomy.json`,
`class_index_map.json`) together with parameters converted by `tools/convert_torch.py`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil

import numpy as np

from linnaeus_jax import config as config_lib

SEP = "/"
FORMAT, VERSION = "linnaeus_jax.bundle", 1
FILES = ("bundle.json", "config.json", "params.npz", "preprocessing.json", "taxonomy.json",
         "class_index_map.json", "model.jax_exported", "card.json", "README.md")


class BundleError(ValueError):
  pass


# ----------------------------------------------------------------------------- parameters


def flatten(tree: dict, prefix: str = "") -> dict:
  """Nested dicts of arrays -> {"a/b/c": array}."""
  flat = {}
  for k, v in tree.items():
    key = f"{prefix}{SEP}{k}" if prefix else str(k)
    if isinstance(v, dict):
      flat.update(flatten(v, key))
    else:
      flat[key] = v
  return flat


def unflatten(flat: dict) -> dict:
  """Inverse of `flatten`; digit keys (unscanned blocks' indices) become ints, as
  `nnx.to_pure_dict` has them."""
  out: dict = {}
  for key, value in flat.items():
    node, parts = out, [int(p) if p.isdigit() else p for p in key.split(SEP)]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return out


def save_params(path: str, variables: dict) -> None:
  """{"params": tree, "buffers": tree} -> one .npz (written to a temporary name, then renamed)."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in flatten(variables).items()})
  os.replace(tmp, path)


def load_params(path: str) -> dict:
  """{"params": tree, "buffers": tree} (an empty tree is absent from the file); BundleError
  naming the file when it is missing, truncated or not an .npz of arrays."""
  if not os.path.isfile(path):
    raise BundleError(f"{path} is missing")
  try:
    f = np.load(path)
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise ValueError("one array (.npy), not an .npz of named arrays")
    with f:
      out = unflatten({k: f[k] for k in f.files})
  except Exception as e:  # pylint: disable=broad-except  (BadZipFile, EOFError, pickle refusal..)
    raise BundleError(f"{path} cannot be read as parameters (.npz): {_why(e)}") from e
  return {"params": out.get("params", {}), "buffers": out.get("buffers", {})}


def check_params(variables: dict, abstract: dict) -> list[str]:
  """Problems of `variables` against the model's `abstract` {"params", "buffers"} pure dicts
  (leaves with .shape): missing and unexpected keys, shape mismatches."""
  got = {k: np.shape(v) for k, v in flatten(variables).items()}
  want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
  problems = []
  if (missing := sorted(set(want) - set(got))):
    problems.append(f"{len(missing)} missing, e.g. {missing[:3]}")
  if (extra := sorted(set(got) - set(want))):
    problems.append(f"{len(extra)} not in the model, e.g. {extra[:3]}")
  if (shapes := [f"{k} {got[k]} (model {want[k]})" for k in sorted(set(got) & set(want))
                 if got[k] != want[k]]):
    problems.append(f"{len(shapes)} of the wrong shape, e.g. {shapes[:3]}")
  return problems


# ----------------------------------------------------------------------------- writing


def class_index_map(class_maps: dict) -> dict:
  return {t: {str(i): int(x) for i, x in sorted(m.items())} for t, m in class_maps.items()}


def write(out: str, config, variables: dict, record: dict, class_maps: dict, taxonomy_json: str,
          info: dict, exported: bytes | None, extra_files: dict | None = None) -> None:
  """Writes the bundle folder `out` (a new folder; assembled beside it, then renamed), with
  `extra_files` {name: text} (the model card's card.json and README.md)."""
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  m = config.model
  meta = {"format": FORMAT, "version": VERSION,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "tasks_coarse_to_fine": sorted(config.data.task_keys_h5, key=config_lib.task_level,
                                         reverse=True),
          "partial_levels": bool(config.data.partial.levels),
          "switches": {"rope_mode": m.rope_mode, "attn_scale": m.attn_scale,
                       "meta_missing": m.meta_missing},
          "exported": exported is not None, **info}
  files = {"bundle.json": json.dumps(meta, indent=1),
           "config.json": config_lib.to_json(config),
           "preprocessing.json": json.dumps(record, indent=1),
           "taxonomy.json": taxonomy_json,
           "class_index_map.json": json.dumps(class_index_map(class_maps), indent=1)}
  files.update(extra_files or {})
  for name, text in files.items():
    with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
      f.write(text)
  save_params(os.path.join(tmp, "params.npz"), variables)
  if exported is not None:
    with open(os.path.join(tmp, "model.jax_exported"), "wb") as f:
      f.write(exported)
  if os.path.exists(out):
    os.rmdir(out)
  os.replace(tmp, out)


# ----------------------------------------------------------------------------- reading


def _why(e: Exception) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split()) or 'no detail'}"


def read_json(path: str, kind: type | None = None):
  """The JSON value of the file at `path` (of type `kind` when given); BundleError naming the
  file when it is missing, unreadable, not JSON or of another type."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError as e:
    raise BundleError(f"{path} is missing") from e
  except json.JSONDecodeError as e:
    raise BundleError(f"{path} is not valid JSON: {e}") from e
  except (OSError, ValueError) as e:  # a folder, no permission, not UTF-8
    raise BundleError(f"{path} cannot be read: {_why(e)}") from e
  if kind is not None and not isinstance(value, kind):
    raise BundleError(f"{path}: expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, got "
                      f"{_JSON_NAMES.get(type(value), type(value).__name__)}")
  return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def read_config(path: str):
  """The config of a `config.json` (a bundle's or a training run's), validated; BundleError
  naming the file for anything wrong: not JSON, not an object, a value of the wrong type (a
  string where a number belongs, a list where a dict does) or an inconsistent config."""
  raw = read_json(path, dict)
  try:
    config = config_lib.from_json(json.dumps(raw))
    config_lib.validate(config, need_data=False)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise BundleError(f"{path}: {_why(e)}") from e
  return config


def read_taxonomy(path: str):
  """TaxonomyTree of a taxonomy.json; BundleError naming the file."""
  from linnaeus_jax.taxonomy import TaxonomyTree  # pylint: disable=g-import-not-at-top
  read_json(path, dict)  # missing, unreadable, not JSON
  try:
    with open(path, encoding="utf-8") as f:
      return TaxonomyTree.from_json(f.read())
  except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
    raise BundleError(f"{path} is not a taxonomy: {_why(e)}") from e


def _number(x) -> bool:
  """A finite JSON number, not a boolean."""
  try:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  except OverflowError:  # an integer too large for a float
    return False


def stats_problems(image: dict, channels: int) -> list[str]:
  """Problems of a record's image "mean"/"std": both absent or null ([0, 1] images), or both
  lists of `channels` finite numbers, std > 0."""
  mean, std = image.get("mean"), image.get("std")
  if mean is None and std is None:
    return []
  if mean is None or std is None:
    return [f"image.mean and image.std must be both null or both lists, got {mean!r} and {std!r}"]
  problems = []
  for name, x in (("mean", mean), ("std", std)):
    if not isinstance(x, list) or not all(_number(v) for v in x):
      problems.append(f"image.{name} must be null or a list of {channels} numbers, got {x!r}")
    elif len(x) != channels:
      problems.append(f"image.{name} has {len(x)} entries, the model takes {channels} channels")
  if not problems and any(v <= 0 for v in std):
    problems.append(f"image.std must be positive, got {std!r}")
  return problems


def check_record(record: dict, config, path: str) -> None:
  """BundleError naming `path` (preprocessing.json) unless `record` has an image size, a
  well-formed mean/std (`stats_problems`) and one well-formed entry per enabled metadata
  component of `config`, in order."""
  problems = []
  image, comps = record.get("image"), record.get("metadata")
  size = image.get("size") if isinstance(image, dict) else None
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    problems.append(f"image.size must be a positive integer, got {size!r}")
  if isinstance(image, dict):
    problems += stats_problems(image, config.model.in_chans)
  if not isinstance(comps, list) or not all(isinstance(c, dict) for c in comps):
    problems.append("metadata must be a list of objects")
  else:
    want = dict(config_lib.enabled_components(config))
    if [c.get("name") for c in comps] != list(want):
      problems.append(f"metadata components {[c.get('name') for c in comps]} are not the "
                      f"config's {list(want)}")
    for c in comps:
      dim, cols = c.get("dim"), c.get("columns")
      if (not isinstance(c.get("encoder"), str) or not isinstance(cols, list)
          or not isinstance(c.get("scales", []), list)):
        problems.append(f"{c.get('name')}: needs encoder (string), columns and scales (lists)")
      elif c.get("name") in want and not dim == len(cols) == want[c["name"]].dim:
        problems.append(f"{c['name']}: dim {dim!r} and {len(cols)} columns, but the model takes "
                        f"{want[c['name']].dim} values")
  if problems:
    raise BundleError(f"{path}: " + "; ".join(problems))


def read(path: str, params: str | None = None) -> dict:
  """{"config", "variables", "preprocessing", "class_maps", "taxonomy", "info"} of a bundle.

  `params`: for an original bundle, the folder written by `tools/convert_torch.py`.
  """
  if not os.path.isdir(path):
    raise BundleError(f"bundle folder {path} not found")
  ours = os.path.exists(os.path.join(path, "bundle.json"))
  if ours:
    info = read_json(os.path.join(path, "bundle.json"), dict)
    if info.get("format") != FORMAT or info.get("version", 0) > VERSION:
      raise BundleError(f"{path}/bundle.json: format {info.get('format')} version "
                        f"{info.get('version')} is not one this linnaeus_jax reads")
    src = path
  else:
    if params is None:
      raise BundleError(f"{path} has no bundle.json: an original bundle needs params= (the "
                        "output folder of python -m linnaeus_jax.tools.convert_torch)")
    info, src = {"source": "original bundle", "params": params}, params
  config = read_config(os.path.join(src, "config.json"))
  variables = load_params(os.path.join(src, "params.npz"))
  taxonomy = read_taxonomy(os.path.join(path, "taxonomy.json"))
  flat = read_json(os.path.join(path, "class_index_map.json"), dict)
  if ours:
    record = read_json(os.path.join(path, "preprocessing.json"), dict)
    check_record(record, config, os.path.join(path, "preprocessing.json"))
  else:
    record = original_preprocessing(path, config)
  problems = []
  class_maps = {}
  for task in config.data.task_keys_h5:
    n = config.model.classification.heads[task].num_classes
    m = flat.get(task)
    if taxonomy.num_classes.get(task, n) < n:  # its consistency pass would index past them
      problems.append(f"taxonomy.json: {task} has {taxonomy.num_classes[task]} classes but the "
                      f"model has {n}")
    if m is None:
      problems.append(f"class_index_map.json has no task {task}")
      continue
    if not isinstance(m, dict):
      problems.append(f"class_index_map.json: {task} must be an object {{class index: taxon id}}")
      continue
    try:
      class_maps[task] = {int(i): int(x) for i, x in m.items()}
    except (TypeError, ValueError):
      problems.append(f"class_index_map.json: {task} must map class indices to integer taxon ids")
      continue
    bad = sorted(i for i in class_maps[task] if not 0 <= i < n)
    if bad or len(class_maps[task]) != n:
      problems.append(f"class_index_map.json: {task} maps {len(class_maps[task])} classes "
                      f"(indices {bad[:5]} out of range) but the model has {n}")
  if problems:
    raise BundleError(f"bundle {path}:\n  " + "\n  ".join(problems))
  return {"config": config, "variables": variables, "preprocessing": record,
          "class_maps": class_maps, "taxonomy": taxonomy, "info": info}


def original_preprocessing(path: str, config) -> dict:
  """The metadata layout of an original bundle, from its inference_config.yaml and the config.

  The image is prepared as the original trained it (area resize, [0, 1], mean/std None), not as
  its inference code did (docs/design.md, one preprocessing path).
  """
  from linnaeus_jax import preprocessing  # pylint: disable=g-import-not-at-top
  mp = {}
  yaml_path = os.path.join(path, "inference_config.yaml")
  if os.path.exists(yaml_path):
    import yaml  # pylint: disable=g-import-not-at-top
    with open(yaml_path, encoding="utf-8") as f:
      mp = (yaml.safe_load(f) or {}).get("metadata_preprocessing", {}) or {}
  comps, problems = [], []
  for name, comp in config_lib.enabled_components(config):
    kind = name.upper()
    if kind == "SPATIAL":
      cols, enc, scales = ["spatial_x", "spatial_y", "spatial_z"], "unit_sphere", []
    elif kind == "TEMPORAL":
      cyc = "doy" if mp.get("temporal_use_julian_day") else "month"
      cols = [f"{cyc}_sin", f"{cyc}_cos"] + (["hour_sin", "hour_cos"] if comp.dim == 4 else [])
      enc, scales = "cyclic_date", []
    elif kind == "ELEVATION":
      scales = [float(s) for s in mp.get("elevation_scales", [])]
      from linnaeus_jax.data import encoders  # pylint: disable=g-import-not-at-top
      cols, enc = encoders.elevation_column_names(scales), "elevation"
    else:
      cols, enc, scales = [f"{name.lower()}_{i}" for i in range(comp.dim)], "unknown", []
    if len(cols) != comp.dim:
      problems.append(f"{name}: the model takes {comp.dim} values but the bundle's settings give "
                      f"{len(cols)} ({cols}); set metadata_preprocessing in inference_config.yaml")
    comps.append({"name": name, "idx": comp.idx, "dim": comp.dim, "source": comp.source,
                  "encoder": enc, "columns": cols, "scales": scales})
  if problems:
    raise BundleError(f"bundle {path}:\n  " + "\n  ".join(problems))
  return {"image": {"size": config.data.img_size, **preprocessing.IMAGE}, "metadata": comps}
