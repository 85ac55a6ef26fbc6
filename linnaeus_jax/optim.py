"""Optax optimizer: parameter groups, per-group LR schedules, clipping (reference/training.md §7-9).

Every parameter belongs to exactly one group: the first group (in
`optimizer.parameter_groups.order`) whose filter matches its '/'-joined path, else `default`.
Each group has its optimizer (adamw | sgd | muon | ademamix), weight decay, LR multiplier and
weight-decay filter; `optax.multi_transform` applies them with exclusive labels. Each group's LR
is a pure function of the step: linear warmup, then a decay measured from the warmup end.

Filters are strings (so that they can be overridden on the command line), e.g.
`"startswith:head/ or (ndim:2 and not contains:meta_)"`:
  contains:S  startswith:S  endswith:S  regex:S   the path ('stage3/blocks/attn/qkv/kernel');
                                                  quote S ('...' or "...") if it has spaces or ()
  ndim:N[,M..]  min_ndim:N  max_ndim:N            the per-block rank (a scanned stage's stacked
                                                  leading axis does not count)
  all  none  decayable                            decayable: the default weight-decay rule
  not  and  or  ( )                               in that order of precedence
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from linnaeus_jax import config as config_lib

Predicate = Callable[[str, tuple], bool]  # (path, per-block shape) -> bool


# ----------------------------------------------------------------------------- Filters


def _decayable(path: str, shape: tuple) -> bool:
  """The default weight-decay rule: matrices and kernels, not biases/norms/tokens/RoPE freqs."""
  parts = path.split("/")
  name = parts[-1]
  return (len(shape) >= 2 and name not in ("bias", "freqs") and "token" not in name
          and not any("norm" in p for p in parts))


def _ndims(values: str) -> Predicate:
  wanted = {int(v) for v in values.split(",")}
  return lambda path, shape: len(shape) in wanted


_ATOMS: dict[str, Callable[[str], Predicate]] = {
    "contains": lambda s: lambda path, shape: s in path,
    "startswith": lambda s: lambda path, shape: path.startswith(s),
    "endswith": lambda s: lambda path, shape: path.endswith(s),
    "regex": lambda s: (lambda r: lambda path, shape: r.search(path) is not None)(re.compile(s)),
    "ndim": _ndims,
    "min_ndim": lambda s: lambda path, shape: len(shape) >= int(s),
    "max_ndim": lambda s: lambda path, shape: len(shape) <= int(s),
}
_KEYWORDS: dict[str, Predicate] = {
    "all": lambda path, shape: True,
    "none": lambda path, shape: False,
    "decayable": _decayable,
}
_TOKEN = re.compile(r"""\s*(?:(?P<paren>[()])|(?P<kind>\w+):(?:'(?P<q1>[^']*)'|"(?P<q2>[^"]*)"|"""
                    r"""(?P<bare>[^\s()]+))|(?P<word>\w+)|(?P<bad>\S+))""")


def _tokens(text: str) -> list[tuple[str, ...]]:
  out = []
  for m in _TOKEN.finditer(text):
    if m["paren"]:
      out.append((m["paren"],))
    elif m["kind"]:
      value = next(v for v in (m["q1"], m["q2"], m["bare"]) if v is not None)
      out.append(("atom", m["kind"], value))
    elif m["word"]:
      out.append((m["word"],) if m["word"] in ("and", "or", "not") else ("atom", m["word"], None))
    elif m["bad"]:
      raise ValueError(f"unexpected {m['bad']!r}")
  return out


@functools.lru_cache(maxsize=None)
def parse_filter(text: str) -> Predicate:
  """The predicate of a filter string; ValueError says what is wrong with it."""
  toks, pos = _tokens(text), 0
  if not toks:
    raise ValueError("empty filter")

  def peek():
    return toks[pos][0] if pos < len(toks) else None

  def take(expected):
    nonlocal pos
    what = "a rule (kind:value, all, none, decayable)" if expected == "atom" else repr(expected)
    if pos >= len(toks):
      raise ValueError(f"ends early: expected {what}")
    if toks[pos][0] != expected:
      raise ValueError(f"expected {what} at token {pos + 1}, got {toks[pos][0]!r}")
    pos += 1
    return toks[pos - 1]

  def joined(word, operand, combine):
    """operand (word operand)*, combined with `combine` (any for 'or', all for 'and')."""
    terms = [operand()]
    while peek() == word:
      take(word)
      terms.append(operand())
    return terms[0] if len(terms) == 1 else (lambda p, s: combine(t(p, s) for t in terms))

  disjunction = lambda: joined("or", conjunction, any)
  conjunction = lambda: joined("and", negation, all)

  def negation():
    if peek() == "not":
      take("not")
      inner = negation()
      return lambda p, s: not inner(p, s)
    if peek() == "(":
      take("(")
      inner = disjunction()
      take(")")
      return inner
    tok = take("atom")
    _, kind, value = tok
    if value is None:
      if kind not in _KEYWORDS:
        raise ValueError(f"unknown word {kind!r} (keywords: {sorted(_KEYWORDS)})")
      return _KEYWORDS[kind]
    if kind not in _ATOMS:
      raise ValueError(f"unknown rule {kind}: (rules: {sorted(_ATOMS)})")
    try:
      return _ATOMS[kind](value)
    except (ValueError, re.error) as e:
      raise ValueError(f"bad value in {kind}:{value} ({e})") from None

  pred = disjunction()
  if pos != len(toks):
    raise ValueError(f"unexpected {toks[pos][0] if toks[pos][0] != 'atom' else toks[pos][1]!r} "
                     f"at token {pos + 1} (join rules with and / or)")
  return pred


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


def _entry(node) -> dict:
  """A group's config entry with the template's values for the keys it leaves out."""
  return {**config_lib.param_group_template().to_dict(), **node.to_dict()}


def _group(name, node, o) -> Group:
  e = _entry(node)
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
  return next(g.name for g in gs if parse_filter(g.filter)(path, shape))


def param_labels(config, params):
  """The group name of every parameter (first matching filter, else 'default')."""
  gs = groups(config)
  return _map(config, functools.partial(_label, gs), params)


def decay_mask(config, group: Group, tree):
  """True where weight decay applies (the group's `decay` filter)."""
  pred = parse_filter(group.decay)
  return _map(config, pred, tree)


def _muon_matrix(config, path: str, shape: tuple) -> bool:
  """Muon's share of a muon group: 2-D / 4-D (conv) per block, minus optimizer.muon.adamw_filter."""
  return len(shape) in (2, 4) and not parse_filter(config.optimizer.muon.adamw_filter)(path, shape)


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
    r["decayed"] += int(parse_filter(g.decay)(path, shape) and g.weight_decay > 0)
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


# ----------------------------------------------------------------------------- Validation


def config_problems(config) -> list[str]:
  """Problems of the optimizer and lr_scheduler sections (for config.validate)."""
  problems, o, s = [], config.optimizer, config.lr_scheduler
  pg = o.parameter_groups

  def check_filter(key, text):
    try:
      parse_filter(text)
    except ValueError as e:
      problems.append(f"{key} {text!r}: {e}")

  def check_group(key, node):
    e = _entry(node)
    if e["optimizer"] and e["optimizer"] not in OPTIMIZERS:
      problems.append(f"{key}.optimizer {e['optimizer']!r} not in {tuple(OPTIMIZERS)} "
                      f"('' = optimizer.name)")
    if not e["lr_multiplier"] > 0:
      problems.append(f"{key}.lr_multiplier must be > 0, got {e['lr_multiplier']}")
    check_filter(f"{key}.decay", e["decay"])
    return e

  if o.name not in OPTIMIZERS:
    problems.append(f"optimizer.name {o.name!r} not in {tuple(OPTIMIZERS)}")
  if len(o.betas) not in (2, 3) or not all(0.0 <= b < 1.0 for b in o.betas):
    problems.append(f"optimizer.betas must be 2 or 3 numbers in [0, 1), got {list(o.betas)}")
  if not 0.0 <= o.momentum < 1.0:
    problems.append(f"optimizer.momentum must be in [0, 1), got {o.momentum}")
  if o.weight_decay < 0:
    problems.append(f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
  if o.muon.ns_steps < 1:
    problems.append("optimizer.muon.ns_steps must be >= 1")
  check_filter("optimizer.muon.adamw_filter", o.muon.adamw_filter)
  check_group("optimizer.parameter_groups.default", pg.default)
  order = list(pg.order)
  if len(set(order)) != len(order):
    problems.append(f"optimizer.parameter_groups.order has duplicates: {order}")
  for name in order:
    if name not in pg.groups:
      problems.append(f"optimizer.parameter_groups.order names {name!r}, which is not in "
                      f"optimizer.parameter_groups.groups")
  for name, node in pg.groups.items():
    key = f"optimizer.parameter_groups.groups.{name}"
    if name == "default":
      problems.append(f"{key}: 'default' is reserved (set optimizer.parameter_groups.default)")
    if name not in order:
      problems.append(f"{key} is not in optimizer.parameter_groups.order (the matching order)")
    e = check_group(key, node)
    if not e["filter"]:
      problems.append(f"{key}.filter is empty (use 'all' to match everything)")
    else:
      check_filter(f"{key}.filter", e["filter"])

  if s.name not in config_lib.LR_SCHEDULES:
    problems.append(f"lr_scheduler.name {s.name!r} not in {config_lib.LR_SCHEDULES}")
  if s.base_lr <= 0:
    problems.append(f"lr_scheduler.base_lr must be positive, got {s.base_lr}")
  if s.min_lr > s.base_lr:
    problems.append(f"lr_scheduler.min_lr {s.min_lr} exceeds base_lr {s.base_lr}")
  if s.warmup_lr < 0 or s.min_lr < 0:
    problems.append("lr_scheduler.warmup_lr and min_lr must be >= 0")
  if s.decay_type not in _ANNEAL:
    problems.append(f"lr_scheduler.decay_type {s.decay_type!r} not in {tuple(_ANNEAL)}")
  if s.name == "step" and (s.decay_steps < 1 or not 0.0 < s.decay_rate <= 1.0):
    problems.append(f"lr_scheduler 'step' needs decay_steps >= 1 and decay_rate in (0, 1], got "
                    f"{s.decay_steps}, {s.decay_rate}")
  fr = (s.stable_duration_fraction, s.decay_duration_fraction)
  if s.name == "wsd" and (min(fr) < 0 or fr[1] <= 0 or sum(fr) > 1.0):
    problems.append(f"lr_scheduler 'wsd' needs stable_duration_fraction >= 0, "
                    f"decay_duration_fraction > 0 and their sum <= 1, got {fr}")
  if s.scale_by_batch and s.reference_bs < 1:
    problems.append(f"lr_scheduler.reference_bs must be >= 1, got {s.reference_bs}")
  return problems
