"""Optax optimizer: parameter groups, per-group LR schedules, clipping (docs/optimization.md).

Every parameter belongs to exactly one group: the first group (in
`optimizer.parameter_groups.order`) whose filter matches its '/'-joined path, else `default`.
Each group has its optimizer (adamw | sgd | muon | ademamix), weight decay, LR multiplier and
weight-decay filter; `optax.multi_transform` applies them with exclusive labels. Each group's LR
is a pure function of the step: linear warmup, then a decay measured from the warmup end.

Filters are strings in the language of `linnaeus_jax/param_filters.py`, e.g.
`"startswith:head/ or (ndim:2 and not contains:meta_)"`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
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


def _label(gs: tuple[Group, ...], path: str, shape: tuple) -> str:
  return next(g.name for g in gs if param_filters.parse(g.filter)(path, shape))


def param_labels(config, params):
  """The group name of every parameter (first matching filter, else 'default')."""
  gs = groups(config)
  return _map(config, functools.partial(_label, gs), params)


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
  updates (not matrices, or matched by optimizer.muon.adamw_filter).
  """
  gs = groups(config)
  rows = {g.name: dict(group=g.name, tensors=0, params=0, optimizer=g.optimizer,
                       weight_decay=g.weight_decay, lr_multiplier=g.lr_multiplier, decayed=0,
                       adamw_tensors=0) for g in gs}
  by_name = {g.name: g for g in gs}
  for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = _path(keys)
    shape = block_shape(config, path, x.shape)
    g = by_name[_label(gs, path, shape)]
    r = rows[g.name]
    r["tensors"] += 1
    r["params"] += int(x.size)
    r["decayed"] += int(param_filters.parse(g.decay)(path, shape) and g.weight_decay > 0)
    r["adamw_tensors"] += int(g.optimizer == "muon" and not _muon_matrix(config, path, shape))
  return list(rows.values())


def format_table(rows: list[dict]) -> str:
  cols = ["group", "tensors", "params", "optimizer", "weight_decay", "lr_multiplier", "decayed",
          "adamw_tensors"]
  cells = [cols] + [[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols]
                    for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  return "\n".join("  ".join(v.ljust(w) if i == 0 or i == 3 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths))) for row in cells)


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
  warmup = config_lib.resolve_steps(s.warmup_steps, s.warmup_fraction, s.warmup_epochs,
                                    total_steps, steps_per_epoch)
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
  """Global-norm clipping (train.clip_grad > 0), then each group's optimizer; the LR schedules.

  The labels and masks are computed when the transformation is traced, from a copy of `config`
  taken here (later changes to `config` do not affect it).
  """
  config = copy.deepcopy(config)
  schedules = lr_schedules(config, total_steps, steps_per_epoch)
  txs = {g.name: OPTIMIZERS[g.optimizer](config, g, schedules[g.name],
                                         functools.partial(decay_mask, config, g))
         for g in groups(config)}
  parts = [optax.clip_by_global_norm(config.train.clip_grad)] if config.train.clip_grad > 0 else []
  parts.append(optax.multi_transform(txs, functools.partial(param_labels, config)))
  return optax.chain(*parts), schedules


def global_norm(tree):
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
