"""Predictor: photos plus where and when -> top-k taxa per rank, coarse to fine (docs/inference.md).

Images and metadata go through the training code (`preprocessing.py`): the same decode and
resize, the same encoders driven by the layout recorded at training. A batch is cut into chunks
padded to a few fixed sizes (`buckets`), so that a new request size never compiles anew. A bad
image is that sample's error, even when no image of a batch can be read; missing, invalid or
physically impossible metadata (`implausible`) make their component invalid (fed to the model as
missing) with a warning naming the field and value.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax import config as config_lib
from linnaeus_jax import models, preprocessing
from linnaeus_jax.inference import bundle as bundle_lib
from linnaeus_jax.taxonomy import TaxonomyTree

CONSISTENCY = ("ancestor", "original", "off")
ELEVATION_M = (-500.0, 9000.0)  # below the Dead Sea shore, above Everest: a unit or typing error
EARLIEST_YEAR = 1800  # older dates are typos (e.g. 0021 for 2021) or not photographs
FIELDS = {"unit_sphere": "lat/lon", "cyclic_date": "datetime_utc", "elevation": "elevation_m"}


def _name(image, i: int) -> str:
  return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"#{i}"


class Predictor:
  """`predict(images, metadata)` -> one JSON-serialisable dict per image.

  Build with `from_workdir` (a training run) or `from_bundle` (an exported or original bundle).
  `class_maps`: {task: {class index: taxon id}}; `taxonomy`: the class tree (for consistency);
  `null_class`: whether index 0 of every rank is the null class (partial labels).
  """

  def __init__(self, config, variables: dict, record: dict, class_maps: dict,
               taxonomy: TaxonomyTree | None, *, buckets: Sequence[int] = (1, 8, 32),
               top_k: int = 5, consistency: str = "ancestor"):
    if consistency not in CONSISTENCY:
      raise ValueError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
    self.config, self.record, self.taxonomy = config, record, taxonomy
    self.tasks = list(config.data.task_keys_h5)
    self.coarse_to_fine = sorted(self.tasks, key=config_lib.task_level, reverse=True)
    self.class_maps = {t: {int(k): int(v) for k, v in class_maps[t].items()} for t in self.tasks}
    self.null_class = bool(config.data.partial.levels)
    self.buckets, self.top_k, self.consistency = sorted(buckets), top_k, consistency
    self.size = int(record["image"]["size"])
    self.layout = record["metadata"]
    self.compiles = 0  # traces of the forward pass: one per bucket size used
    graphdef, abstract_params, abstract_buffers = models.abstract(config)
    problems = bundle_lib.check_params(variables, {"params": nnx.to_pure_dict(abstract_params),
                                                   "buffers": nnx.to_pure_dict(abstract_buffers)})
    if problems:
      raise bundle_lib.BundleError("the parameters do not fit the config's model: "
                                   + "; ".join(problems))
    self.variables = jax.device_put(variables)
    mean, std = preprocessing.recorded_stats(record)  # as the model was trained

    def forward(variables, image_u8, meta, valid):
      self.compiles += 1
      model = nnx.merge(graphdef, variables["params"], variables["buffers"])
      logits = model(preprocessing.normalize(image_u8, mean, std), meta, valid, train=False)
      return {t: jax.nn.softmax(logits[t].astype(jnp.float32), -1) for t in logits}
    self._forward = jax.jit(forward)

  # --------------------------------------------------------------------------- loading

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kw) -> "Predictor":
    """A training run's checkpoint (default: the latest) with its config and assets."""
    w = load_workdir(workdir, step)
    try:
      return cls(w["config"], w["variables"], w["preprocessing"], w["class_maps"], w["taxonomy"],
                 **kw)
    except bundle_lib.BundleError as e:
      raise bundle_lib.BundleError(f"{workdir}: checkpoint {w['step']}: {e}") from e

  @classmethod
  def from_bundle(cls, path: str, params: str | None = None, **kw) -> "Predictor":
    """Our bundle (`python -m linnaeus_jax.export`), or an original bundle folder (its
    `taxonomy.json` and `class_index_map.json`) with `params` = a `convert_torch` output."""
    b = bundle_lib.read(path, params)
    try:
      return cls(b["config"], b["variables"], b["preprocessing"], b["class_maps"], b["taxonomy"],
                 **kw)
    except bundle_lib.BundleError as e:
      src = params or path
      raise bundle_lib.BundleError(f"{os.path.join(src, 'params.npz')} does not match "
                                   f"{os.path.join(src, 'config.json')}: {e}") from e

  # --------------------------------------------------------------------------- predicting

  def bucket(self, n: int) -> int:
    return next((b for b in self.buckets if b >= n), self.buckets[-1])

  def probs_batch(self, images_u8, meta: dict, valid):
    """Probabilities {task: (B, C)} of an already preprocessed batch, chunked and padded; B may
    be 0 (a batch of unreadable images)."""
    n, out = len(images_u8), []
    if n == 0:
      heads = self.config.model.classification.heads
      return {t: np.zeros((0, heads[t].num_classes), np.float32) for t in self.tasks}
    for a in range(0, n, self.buckets[-1]):
      chunk = slice(a, min(a + self.buckets[-1], n))
      m = chunk.stop - chunk.start
      pad = lambda x, m=m: np.concatenate(
          [x, np.zeros((self.bucket(m) - m,) + x.shape[1:], x.dtype)]) if self.bucket(m) > m else x
      probs = self._forward(self.variables, pad(images_u8[chunk]),
                            {k: pad(v[chunk]) for k, v in meta.items()}, pad(valid[chunk]))
      out.append({t: np.asarray(p)[:m] for t, p in probs.items()})
    return {t: np.concatenate([o[t] for o in out]) for t in self.tasks}

  def prepare(self, image, metadata: dict | None = None):
    """One sample, decoded and encoded (thread-safe, no device work): (uint8 image, {component:
    vector}, valid, warnings, error or None); an unreadable image gives zeros and its error."""
    try:
      image_u8, error = preprocessing.to_rgb_uint8(image, self.size), None
    except Exception as e:  # pylint: disable=broad-except  (any undecodable input)
      image_u8 = np.zeros((self.size, self.size, 3), np.uint8)
      error = f"image could not be read: {type(e).__name__}: {e}"
    if metadata is not None and not isinstance(metadata, dict):
      meta, valid, _ = preprocessing.encode_metadata(self.layout, None)
      warnings = [f"metadata is not an object: {metadata!r}; all components invalid"]
    else:
      meta, valid, warnings = encode_metadata(self.layout, metadata)
    return image_u8, meta, valid, warnings, error

  def stack(self, samples: Sequence[tuple]):
    """`prepare`d samples -> (uint8 images (B, S, S, 3), {component: (B, dim)}, valid (B, C))."""
    names = [c["name"] for c in self.layout]
    if not samples:
      return (np.zeros((0, self.size, self.size, 3), np.uint8),
              {k: np.zeros((0, c["dim"]), np.float32) for k, c in zip(names, self.layout)},
              np.zeros((0, len(names)), bool))
    return (np.stack([s[0] for s in samples]), {k: np.stack([s[1][k] for s in samples])
                                                for k in names},
            np.stack([s[2] for s in samples]))

  def preprocess(self, images: Sequence[Any], metadata: Sequence[dict | None] | None = None):
    """(uint8 images, meta, valid, per-sample warnings, per-sample errors) of all samples."""
    metadata = list(metadata) if metadata is not None else [None] * len(images)
    if len(metadata) != len(images):
      raise ValueError(f"{len(images)} images but {len(metadata)} metadata entries")
    samples = [self.prepare(img, md) for img, md in zip(images, metadata)]
    return (*self.stack(samples), [s[3] for s in samples], [s[4] for s in samples])

  def result(self, name: str, probs: dict | None, warnings: list, error: str | None,
             top_k: int | None = None) -> dict:
    """The record of one sample from its probabilities {task: (C,)} (None: `error`)."""
    res = {"image": name, "ranks": [], "warnings": warnings, "error": error}
    if error is None:
      res["ranks"] = self.consistent([(t, probs[t]) for t in self.coarse_to_fine],
                                     top_k or self.top_k, res["warnings"])
    return res

  def predict(self, images: Sequence[Any], metadata: Sequence[dict | None] | None = None,
              top_k: int | None = None) -> list[dict]:
    """One dict per image: {"image", "ranks": [{"task", "top_k": [[taxon_id, p], ...]}, ...]
    coarse to fine, "warnings": [...], "error": None or why the image could not be used}.

    `images`: paths, bytes, PIL images or HxWx3 arrays; `metadata`: dicts with any of `lat`,
    `lon`, `datetime_utc` (ISO string or datetime), `elevation_m`.
    """
    images_u8, meta, valid, warnings, errors = self.preprocess(images, metadata)
    ok = [i for i, e in enumerate(errors) if e is None]
    probs = self.probs_batch(images_u8[ok], {n: v[ok] for n, v in meta.items()}, valid[ok])
    row = {i: j for j, i in enumerate(ok)}
    return [self.result(_name(image, i), {t: p[row[i]] for t, p in probs.items()}
                        if i in row else None, warnings[i], errors[i], top_k)
            for i, image in enumerate(images)]

  # --------------------------------------------------------------------------- consistency

  def _taxon(self, task: str, idx: int) -> int:
    return self.class_maps[task].get(int(idx), -1)

  def consistent(self, ranked: list, k: int, warnings: list) -> list[dict]:
    """Top-k per rank after the hierarchical consistency pass (`consistency_pass`)."""
    tops = [int(np.argmax(p)) for _, p in ranked]
    keep = consistency_pass([t for t, _ in ranked], tops, self.taxonomy, self.null_class,
                            self.consistency)
    out = []
    for (task, p), state in zip(ranked, keep):
      if state == "omit":
        warnings.append(f"{task} omitted: its top-1 is not a descendant of the coarser ranks'")
        continue
      if state == "null":
        out.append({"task": task, "top_k": [[self._taxon(task, 0), 1.0]]})
        continue
      order = np.argsort(-p, kind="stable")[:min(k, len(p))]
      out.append({"task": task, "top_k": [[self._taxon(task, c), float(p[c])] for c in order]})
    return out


def consistency_pass(tasks: list[str], tops: list[int], taxonomy: TaxonomyTree | None,
                     null_class: bool, mode: str = "ancestor") -> list[str]:
  """'keep', 'null' or 'omit' per rank (`tasks` coarse to fine, `tops` their top-1 classes).

  ancestor (ours): a rank's top-1 must descend from the nearest kept coarser rank's top-1
  (across skipped levels); a rank missing from the taxonomy is kept without judging it or
  its children. On failure, with a null class the rank and every finer one are nulled, without
  one they are omitted. A null top-1 nulls every finer rank. The coarsest rank is never changed.
  original: the original's rule (docs/design.md, consistency): the previous rank in the list is
  the parent; only a direct parent link counts; an unknown rank nulls the next; nulling cascades.
  off: keep all.
  """
  n = len(tasks)
  if mode == "off" or taxonomy is None or n == 0:
    return ["keep"] * n
  fail = "null" if null_class or mode == "original" else "omit"
  out, anchor = ["keep"], (tasks[0], tops[0])  # the coarsest rank is never changed
  known = set(taxonomy.task_keys)
  for i in range(1, n):
    task, top = tasks[i], tops[i]
    if out[-1] in ("null", "omit"):
      out.append(out[-1])
      continue
    parent_task, parent_top = anchor
    if null_class and parent_top == 0:
      out.append("null")
      continue
    if mode == "original":
      chain = taxonomy.task_keys
      direct = (task in known and parent_task in known
                and chain.index(parent_task) == chain.index(task) + 1)
      ok = direct and int(taxonomy.parents[task][top]) == parent_top
      out.append("keep" if ok else "null")
      anchor = (task, top)
      continue
    if task not in known or parent_task not in known:
      out.append("keep")  # nothing to judge it by; the anchor stays
      continue
    up = taxonomy.task_keys.index(parent_task) - taxonomy.task_keys.index(task)
    anc = taxonomy.ancestors(task, null_class=null_class)
    if up <= 0 or up >= anc.shape[0] or int(anc[up, top]) != parent_top:
      out.append(fail)
      continue
    out.append("keep")
    anchor = (task, top)
  return out


def implausible(encoder: str, request: dict, now: dt.datetime | None = None) -> str | None:
  """Why the request's value for a component with `encoder` is physically impossible, naming the
  field and value; None when it is plausible, absent or malformed (`preprocessing` reports
  those). lat/lon ranges are checked there; here: elevation outside `ELEVATION_M` and dates
  before `EARLIEST_YEAR` or more than a day after `now` (default: the current time; naive
  dates are UTC; the day spares local times written as UTC)."""
  if encoder == "elevation":
    value = request.get("elevation_m")
    try:
      x = float(value)
    except (TypeError, ValueError, OverflowError):
      return None
    lo, hi = ELEVATION_M
    if np.isfinite(x) and not lo <= x <= hi:
      return f"elevation_m {value!r} is outside {lo:g}..{hi:g} m"
  if encoder == "cyclic_date":
    value = request.get("datetime_utc")
    when = value
    if isinstance(value, str):
      try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
      except ValueError:
        return None
    if not isinstance(when, dt.datetime):
      return None
    if when.tzinfo is None:
      when = when.replace(tzinfo=dt.timezone.utc)
    if when.year < EARLIEST_YEAR:
      return f"datetime_utc {_show(value)} is before {EARLIEST_YEAR}"
    if when > (now or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(days=1):
      return f"datetime_utc {_show(value)} is in the future"
  return None


def _show(value) -> str:
  return repr(value.isoformat() if isinstance(value, dt.datetime) else value)


def encode_metadata(layout: list[dict], request: dict | None):
  """`preprocessing.encode_metadata` with physically impossible values (`implausible`), and any
  value its encoder fails on (e.g. an integer too large for a float), also making their
  component invalid: ({name: (dim,) float32}, valid (C,) bool, warnings)."""
  meta, valid, warnings = {}, [], []
  for comp in layout:
    why = implausible(comp["encoder"], request or {})
    if why is None:
      try:
        m, v, w = preprocessing.encode_metadata([comp], request)
      except Exception as e:  # pylint: disable=broad-except  (a value no encoder expects)
        why = f"{FIELDS.get(comp['encoder'], 'value')} not usable: {type(e).__name__}: {e}"
    if why is not None:
      m, v, w = ({comp["name"]: np.zeros(comp["dim"], np.float32)}, np.zeros(1, bool),
                 [f"{comp['name']} invalid: {why}"])
    meta.update(m)
    valid.append(v)
    warnings += w
  return meta, (np.concatenate(valid) if valid else np.zeros(0, bool)), warnings


def class_maps_from_class_to_idx(class_to_idx: dict) -> dict:
  """Our assets' {task: {taxon id | "null": idx}} -> {task: {idx: taxon id}} (null -> 0)."""
  return {t: {int(i): (0 if k == "null" else int(k)) for k, i in m.items()}
          for t, m in class_to_idx.items()}


def load_workdir(workdir: str, step: int | None = None) -> dict:
  """What `bundle.read` gives, from a training run's checkpoint (default: the latest) and
  assets, plus "taxonomy_json" and "step"."""
  config, variables, step = load_checkpoint(workdir, step)
  assets = os.path.join(workdir, "assets")
  record_path = os.path.join(assets, "preprocessing.json")
  if os.path.exists(record_path):
    record = bundle_lib.read_json(record_path, dict)
    bundle_lib.check_record(record, config, record_path)
  else:
    record = preprocessing.record(config)  # runs from before the record existed
  taxonomy_path = os.path.join(assets, "taxonomy_tree.json")
  taxonomy = bundle_lib.read_taxonomy(taxonomy_path)
  with open(taxonomy_path, encoding="utf-8") as f:
    taxonomy_json = f.read()
  c2i_path = os.path.join(assets, "class_to_idx.json")
  try:
    class_maps = class_maps_from_class_to_idx(bundle_lib.read_json(c2i_path, dict))
  except (AttributeError, TypeError, ValueError) as e:
    raise bundle_lib.BundleError(f"{c2i_path}: expected {{task: {{taxon id: class index}}}}: "
                                 f"{type(e).__name__}: {e}") from e
  return {"config": config, "variables": variables, "preprocessing": record, "step": step,
          "class_maps": class_maps, "taxonomy": taxonomy, "taxonomy_json": taxonomy_json}


def load_checkpoint(workdir: str, step: int | None = None):
  """(config, {"params", "buffers"} as numpy trees, step) from DIR's checkpoint."""
  from linnaeus_jax import sharding, state as state_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} not found")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  config = bundle_lib.read_config(path)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # Orbax would create it
    raise FileNotFoundError(f"{workdir} has no checkpoints/ folder")
  taxonomy = bundle_lib.read_taxonomy(os.path.join(workdir, "assets", "taxonomy_tree.json"))
  step, state, _, _ = state_lib.restore_state(config, workdir, taxonomy.parents,
                                              sharding.make_mesh(config), step)
  variables = jax.device_get({"params": state.params, "buffers": state.buffers})
  return config, variables, step
