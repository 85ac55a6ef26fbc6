"""Optax optimizer: parameter groups, per-group LR schedules, clipping (docs/optimization.md).

Every parameter belongs to exactly one group: the first group (in
`optimizer.parameter_groups.order`) whose filter matches its '/'-joined path, else `default`.
Each group has its optimizer (adamw | sgd | muon | ademamix), weight decay, LR multiplier and
weight-decay filter; `optax.multi_transform` applies them with exclusive labels. Each group's LR
is a pure function of the step: linear warmup, then a decay measured from the warmup end.

Fine-tuning: parameters matching `optimizer.freeze` are labelled `frozen` (before any group) and
get neither updates nor optimizer state; `optimizer.layer_decay` < 1 scales each parameter's final
update by layer_decay ** (L + 1 - layer id) (timm / BEiT layer-wise LR decay).

Filters are strings in the language of `linnaeus_jax/param_filters.py`, e.g.
`"startswith:head/ or (ndim:2 and not contains:meta_)"`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

from linnaeus_jax import config as config_lib
from linnaeus_jax import param_filters


# ----------------------------------------------------------------------------- Groups


@dataclasses.dataclass(frozen=True)
class Group:
  """One parameter group, resolved from the config (inherited values filled in)."""
  name: str
  filter: str
  optimizer: str
  weight_decay: float
  lr_multiplier: float
  decay: str  # filter of the group's parameters that get weight decay


def _group(name, node, o) -> Group:
  e = config_lib.param_group_values(node)
  return Group(name=name, filter=e["filter"] or "all", optimizer=e["optimizer"] or o.name,
               weight_decay=o.weight_decay if e["weight_decay"] < 0 else e["weight_decay"],
               lr_multiplier=e["lr_multiplier"], decay=e["decay"])


def groups(config) -> tuple[Group, ...]:
  """The groups in matching order, `default` last (the only one when groups are disabled)."""
  o, pg = config.optimizer, config.optimizer.parameter_groups
  default = _group("default", pg.default, o)
  if not pg.enabled:
    return (default,)
  return tuple(_group(n, pg.groups[n], o) for n in pg.order) + (default,)


def _path(keys) -> str:
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def _stacked(config, path: str) -> bool:
  return bool(config.model.scan_blocks) and "blocks" in path.split("/")


def block_shape(config, path: str, shape) -> tuple:
  """The shape of one block's parameter: a scanned stage's leading (depth) axis dropped."""
  shape = tuple(shape)
  return shape[1:] if shape and _stacked(config, path) else shape


def _map(config, fn, tree):
  """fn(path, per-block shape) on every leaf (also on optax's masked trees)."""
  return jax.tree_util.tree_map_with_path(
      lambda keys, x: fn(_path(keys), block_shape(config, _path(keys), x.shape)), tree)


FROZEN = "frozen"  # the label of parameters matching optimizer.freeze


def _frozen_pred(config):
  """optimizer.freeze as a predicate ('' = nothing is frozen)."""
  f = config.optimizer.freeze
  return param_filters.parse(f) if f else param_filters.KEYWORDS["none"]


def frozen_mask(config, tree):
  """True where `optimizer.freeze` matches: no update, no optimizer state."""
  return _map(config, _frozen_pred(config), tree)


def _label(gs: tuple[Group, ...], frozen, path: str, shape: tuple) -> str:
  if frozen(path, shape):
    return FROZEN
  return next(g.name for g in gs if param_filters.parse(g.filter)(path, shape))


def param_labels(config, params):
  """The group name of every parameter: 'frozen' if optimizer.freeze matches, else the first
  group whose filter matches, else 'default'."""
  gs = groups(config)
  if config.optimizer.freeze and any(g.name == FROZEN for g in gs):
    raise ValueError(f"the group name {FROZEN!r} is reserved while optimizer.freeze is set")
  return _map(config, functools.partial(_label, gs, _frozen_pred(config)), params)


def decay_mask(config, group: Group, tree):
  """True where weight decay applies (the group's `decay` filter)."""
  pred = param_filters.parse(group.decay)
  return _map(config, pred, tree)


def _muon_matrix(config, path: str, shape: tuple) -> bool:
  """Muon's share of a muon group: 2-D / 4-D (conv) per block, minus optimizer.muon.adamw_filter."""
  adamw = param_filters.parse(config.optimizer.muon.adamw_filter)
  return len(shape) in (2, 4) and not adamw(path, shape)


def group_table(config, params) -> list[dict]:
  """Per group: tensors, parameters, optimizer, weight decay, LR multiplier.

  `decayed`: tensors with weight decay; `adamw_tensors`: the tensors of a muon group that AdamW
  updates (not matrices, or matched by optimizer.muon.adamw_filter). Frozen tensors
  (optimizer.freeze) count only in a first row `frozen` (optimizer 'none'), present if any.
  """
  gs = groups(config)
  frozen = _frozen_pred(config)
  rows = {g.name: dict(group=g.name, tensors=0, params=0, optimizer=g.optimizer,
                       weight_decay=g.weight_decay, lr_multiplier=g.lr_multiplier, decayed=0,
                       adamw_tensors=0) for g in gs}
  ice = dict(group=FROZEN, tensors=0, params=0, optimizer="none", weight_decay=0.0,
             lr_multiplier=0.0, decayed=0, adamw_tensors=0)
  by_name = {g.name: g for g in gs}
  for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = _path(keys)
    shape = block_shape(config, path, x.shape)
    if frozen(path, shape):
      ice["tensors"] += 1
      ice["params"] += int(x.size)
      continue
    g = by_name[_label(gs, frozen, path, shape)]
    r = rows[g.name]
    r["tensors"] += 1
    r["params"] += int(x.size)
    r["decayed"] += int(param_filters.parse(g.decay)(path, shape) and g.weight_decay > 0)
    r["adamw_tensors"] += int(g.optimizer == "muon" and not _muon_matrix(config, path, shape))
  return ([ice] if ice["tensors"] else []) + list(rows.values())


def format_table(rows: list[dict]) -> str:
  cols = ["group", "tensors", "params", "optimizer", "weight_decay", "lr_multiplier", "decayed",
          "adamw_tensors"]
  cells = [cols] + [[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols]
                    for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  return "\n".join("  ".join(v.ljust(w) if i == 0 or i == 3 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths))) for row in cells)


# ----------------------------------------------------------------------------- Layer-wise LR decay

_STAGES = ("stage0", "stage1", "stage3", "stage4")
# Top-level modules that feed a stage take the id of its first block.
_BEFORE = {"down0": "stage1", "down1": "stage3", "cls_token_1": "stage3", "meta_1": "stage3",
           "down2": "stage4", "cls_token_2": "stage4", "meta_2": "stage4"}


def stage_depths(config) -> dict[str, int]:
  """mFormerV1's blocks per stage: the first two ConvNeXt depths, then the two RoPE depths."""
  d0, d1 = (int(d) for d in config.model.convnext_stages.depths[:2])
  n3, n4 = (int(d) for d in config.model.rope_stages.depths)
  return dict(zip(_STAGES, (d0, d1, n3, n4)))


def num_layers(config) -> int:
  """L: the blocks of all four stages (layer ids run 0 (stem) .. L + 1 (heads and the rest))."""
  return sum(stage_depths(config).values())


def layer_id(config, path: str, block: int = 0) -> int:
  """The layer id of a parameter (timm / BEiT): stem 0, block i of the network 1 + i, the
  downsample / cls token / metadata tokens feeding a stage that of its first block, the rest
  (norms, aggregation, heads, unknown names) L + 1. `block`: the block index within the stage
  when the path has none (a scanned stage)."""
  parts = path.split("/")
  top = parts[0]
  depths = [stage_depths(config)[s] for s in _STAGES]
  first = dict(zip(_STAGES, (1 + sum(depths[:k]) for k in range(len(_STAGES)))))
  if top in ("stem_conv", "stem_norm"):
    return 0
  if top in _BEFORE:
    return first[_BEFORE[top]]
  if top in first:
    if len(parts) > 2 and parts[1] == "blocks" and parts[2].isdigit():
      block = int(parts[2])
    return first[top] + block
  return num_layers(config) + 1


def layer_scales(config, tree):
  """Per leaf, layer_decay ** (L + 1 - layer id): a float, or for a scanned stage's stacked
  leaf (depth, ...) an array (depth, 1, ..., 1) with one factor per block. `tree`: arrays or
  ShapeDtypeStructs."""
  decay, top = float(config.optimizer.layer_decay), num_layers(config) + 1
  depths = stage_depths(config)

  def scale(keys, x):
    path = _path(keys)
    stage = path.split("/")[0]
    if _stacked(config, path) and stage in depths:
      depth = x.shape[0]
      if depth != depths[stage]:
        raise ValueError(f"{path}: leading axis {depth} is not the depth {depths[stage]} of "
                         f"{stage}")
      ids = np.array([layer_id(config, path, i) for i in range(depth)])
      return (decay ** (top - ids)).astype(np.float32).reshape((depth,) + (1,) * (x.ndim - 1))
    return decay ** (top - layer_id(config, path))
  return jax.tree_util.tree_map_with_path(scale, tree)


def scale_by_layer(config) -> optax.GradientTransformation:
  """Stateless: multiply each update by its `layer_scales` factor (the last transformation, so
  that it scales the whole update, decoupled weight decay included, as timm's lr_scale does)."""
  def update(updates, state, params=None):
    del params
    scales = layer_scales(config, updates)
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# ----------------------------------------------------------------------------- LR schedules


@dataclasses.dataclass(frozen=True)
class LrSpec:
  """The LR curve with every duration resolved to steps (before the group multiplier)."""
  name: str
  peak: float
  warmup_lr: float
  min_lr: float
  warmup: int
  decay: int  # total_steps - warmup, the span every decay is measured over
  decay_steps: int
  decay_rate: float
  stable: int  # wsd
  wsd_decay: int
  decay_type: str
  factor: float  # batch scaling (already in peak, warmup_lr and min_lr)


def samples_per_update(config) -> int:
  """Samples in one optimizer update: data.batch_size (split into accumulation micro-batches)."""
  return int(config.data.batch_size)


def batch_factor(config) -> float:
  s = config.lr_scheduler
  return samples_per_update(config) / s.reference_bs if s.scale_by_batch else 1.0


def lr_spec(config, total_steps: int, steps_per_epoch: int) -> LrSpec:
  s = config.lr_scheduler
  warmup = config_lib.resolve_duration(config, "lr_scheduler.warmup", total_steps, steps_per_epoch)
  warmup = min(warmup, max(total_steps - 1, 0))
  decay = max(total_steps - warmup, 1)
  f = batch_factor(config)
  return LrSpec(name=s.name, peak=s.base_lr * f, warmup_lr=s.warmup_lr * f, min_lr=s.min_lr * f,
                warmup=warmup, decay=decay, decay_steps=int(s.decay_steps),
                decay_rate=float(s.decay_rate),
                stable=int(s.stable_duration_fraction * decay),
                wsd_decay=max(int(s.decay_duration_fraction * decay), 1),
                decay_type=s.decay_type, factor=f)


def _cosine_to(peak, low, frac):
  return low + 0.5 * (peak - low) * (1.0 + jnp.cos(jnp.pi * frac))


def _linear_to(peak, low, frac):
  return peak - (peak - low) * frac


_ANNEAL = {"cosine": _cosine_to, "linear": _linear_to}

# u = steps since the warmup end (>= 0).
_DECAYS: dict[str, Callable[[LrSpec, jax.Array], jax.Array]] = {
    "cosine": lambda p, u: _cosine_to(p.peak, p.min_lr, jnp.minimum(u / p.decay, 1.0)),
    "linear": lambda p, u: _linear_to(p.peak, p.min_lr, jnp.minimum(u / p.decay, 1.0)),
    "step": lambda p, u: jnp.maximum(
        p.peak * p.decay_rate ** jnp.floor(u / p.decay_steps), p.min_lr),
    "wsd": lambda p, u: _ANNEAL[p.decay_type](
        p.peak, p.min_lr, jnp.clip((u - p.stable) / p.wsd_decay, 0.0, 1.0)),
    "constant": lambda p, u: jnp.full_like(u, p.peak),
}


def schedule(spec: LrSpec, multiplier: float = 1.0) -> optax.Schedule:
  """multiplier x (linear warmup warmup_lr -> peak over `warmup` steps, then the decay)."""
  def lr(step):
    t = jnp.asarray(step, jnp.float32)
    warm = spec.warmup_lr + (spec.peak - spec.warmup_lr) * t / max(spec.warmup, 1)
    after = _DECAYS[spec.name](spec, jnp.maximum(t - spec.warmup, 0.0))
    return multiplier * jnp.where(t < spec.warmup, warm, after)
  return lr


def lr_schedules(config, total_steps: int, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  spec = lr_spec(config, total_steps, steps_per_epoch)
  return {g.name: schedule(spec, g.lr_multiplier) for g in groups(config)}


# ----------------------------------------------------------------------------- Optimizers


def _adamw(config, g: Group, lr, mask):
  o = config.optimizer
  return optax.adamw(lr, b1=o.betas[0], b2=o.betas[1], eps=o.eps, weight_decay=g.weight_decay,
                     mask=mask)


def _sgd(config, g: Group, lr, mask):
  # torch.optim.SGD semantics: weight decay added to the gradient before the momentum.
  return optax.chain(optax.add_decayed_weights(g.weight_decay, mask),
                     optax.sgd(lr, momentum=config.optimizer.momentum, nesterov=True))


def _beta3(b1: float, b3: float, horizon: int):
  """AdEMAMix's beta3 warmup (apple/ml-ademamix), by update count (1-based)."""
  lb1, lb3 = jnp.log(b1), jnp.log(b3)

  def fn(count):
    frac = jnp.minimum((count + 1.0) / horizon, 1.0)
    return jnp.minimum(jnp.exp(lb1 * lb3 / ((1.0 - frac) * lb3 + frac * lb1)), b3)
  return fn


def _ademamix(config, g: Group, lr, mask):
  o = config.optimizer
  b3 = o.betas[2] if len(o.betas) > 2 else 0.9999
  alpha, beta3 = o.alpha, b3
  if o.t_alpha_beta3 > 0:
    alpha = lambda count: jnp.minimum((count + 1.0) * o.alpha / o.t_alpha_beta3, o.alpha)
    beta3 = _beta3(o.betas[0], b3, o.t_alpha_beta3)
  return contrib.ademamix(lr, b1=o.betas[0], b2=o.betas[1], b3=beta3, alpha=alpha, eps=o.eps,
                          weight_decay=g.weight_decay, mask=mask)


def _scale_by_width(dim_nums_fn) -> optax.GradientTransformation:
  """Muon's sqrt(max(1, fan_out / fan_in)) (per block; fan_in = the flattened reduction axes)."""
  def scale(u, d):
    fan_in = 1
    for ax in d.reduction_axis:
      fan_in *= u.shape[ax]
    return u * max(1.0, u.shape[d.output_axis] / fan_in) ** 0.5

  def update(updates, state, params=None):
    del params
    dims = dim_nums_fn(updates)
    return jax.tree.map(scale, updates, dims, is_leaf=lambda x: isinstance(
        x, contrib.MuonDimensionNumbers)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def muon_dimension_numbers(config, tree):
  """Muon's reshape of each (muon) leaf: (in, out) or HWIO conv as (H*W*I, out), per block."""
  def dims(keys, x):
    path = _path(keys)
    off = 1 if x.ndim > 0 and _stacked(config, path) else 0
    nd = x.ndim - off
    return contrib.MuonDimensionNumbers(reduction_axis=tuple(range(off, off + nd - 1)),
                                        output_axis=off + nd - 1)
  return jax.tree_util.tree_map_with_path(dims, tree)


def _muon(config, g: Group, lr, mask):
  """Muon on the group's matrices (2-D, and 4-D conv kernels reshaped to 2-D per block);
  AdamW (same LR, weight decay and decay filter) on the rest."""
  m = config.optimizer.muon
  dims = functools.partial(muon_dimension_numbers, config)
  matrices = optax.chain(
      contrib.scale_by_muon(ns_steps=m.ns_steps, beta=m.momentum, nesterov=m.nesterov,
                            weight_dimension_numbers=dims),
      _scale_by_width(dims),
      optax.add_decayed_weights(g.weight_decay, mask),
      optax.scale_by_learning_rate(lr))
  labels = lambda tree: _map(config, lambda p, s: "muon" if _muon_matrix(config, p, s)
                             else "adamw", tree)
  return optax.partition({"muon": matrices, "adamw": _adamw(config, g, lr, mask)}, labels)


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd, "muon": _muon, "ademamix": _ademamix}


def build(config, total_steps: int, steps_per_epoch: int
          ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """Frozen gradients zeroed (optimizer.freeze), global-norm clipping (train.clip_grad > 0), each
  group's optimizer (frozen parameters: none, no state), layer-wise LR decay
  (optimizer.layer_decay < 1); the LR schedules.

  Zeroing before clipping makes the clipping norm that of the trainable gradients. The labels and
  masks are computed when the transformation is traced, from `config` (the resolved, frozen one).
  """
  schedules = lr_schedules(config, total_steps, steps_per_epoch)
  txs = {g.name: OPTIMIZERS[g.optimizer](config, g, schedules[g.name],
                                         functools.partial(decay_mask, config, g))
         for g in groups(config)}
  parts = []
  if config.optimizer.freeze:
    if FROZEN in txs:
      raise ValueError(f"the group name {FROZEN!r} is reserved while optimizer.freeze is set")
    txs[FROZEN] = optax.set_to_zero()
    parts.append(optax.masked(optax.set_to_zero(), functools.partial(frozen_mask, config)))
  if config.train.clip_grad > 0:
    parts.append(optax.clip_by_global_norm(config.train.clip_grad))
  parts.append(optax.multi_transform(txs, functools.partial(param_labels, config)))
  if config.optimizer.layer_decay < 1.0:
    parts.append(scale_by_layer(config))
  return optax.chain(*parts), schedules


def global_norm(tree):
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
