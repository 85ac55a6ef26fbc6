"""Training-time probabilities as pure functions of the step (docs/training.md#schedules).

Every end is a duration of `config.DURATIONS`, resolved to an integer step once, at start-up, by
`config.resolve_duration` (the one member set, else the table's default;
docs/design.md#one-duration-rule); the functions below are then jnp-traceable in the step, so they
run inside the jitted train step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from linnaeus_jax import config as config_lib


def ramp(step, p0: float, p1: float, end: int):
  """p0 + (p1 - p0) * clip(step / end, 0, 1): linear to `end`, constant afterwards."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(end, 1), 0.0, 1.0)
  return p0 + (p1 - p0) * frac


def window(step, start: int, end: int):
  """start <= step < end."""
  step = jnp.asarray(step)
  return (step >= start) & (step < end)


@dataclasses.dataclass(frozen=True)
class Ramp:
  """A linear probability ramp; `off` is its value when disabled."""
  enabled: bool
  start_prob: float
  end_prob: float
  end_step: int
  off: float = 0.0

  def __call__(self, step):
    if not self.enabled:
      return jnp.full((), self.off, jnp.float32)
    return ramp(step, self.start_prob, self.end_prob, self.end_step)


def _ramp(config, name: str, total: int, spe: int, off: float = 0.0) -> Ramp:
  """The ramp of the config node `name`, ending at its duration of `config.RAMPS`."""
  node, prefix = config_lib.lookup(config, name), config_lib.RAMPS[name]
  end = config_lib.resolve_duration(config, f"{name}.{prefix}", total, spe)
  if node.enabled and end <= 0 and node.start_prob != node.end_prob:
    raise config_lib.ConfigError(f"{name} ramps {node.start_prob} -> {node.end_prob} but has no "
                                 f"end: set {prefix}_steps or {prefix}_fraction")
  return Ramp(bool(node.enabled), float(node.start_prob), float(node.end_prob), end, off)


@dataclasses.dataclass(frozen=True)
class Schedules:
  """All scheduled probabilities of a run, with their ends resolved to steps.

  meta_mask: p_full, every component of a sample masked. partial: p_part, one whitelist
  combination masked, only inside [partial_start, partial_end). null_keep: probability that a
  null label's loss is kept (1 when disabled). mix: probability that a batch is mixed.
  `combos_KxC` is the whitelist as a component table in packing (idx) order.
  """
  meta_mask: Ramp
  partial: Ramp
  partial_start: int
  partial_end: int
  combos_KxC: tuple[tuple[bool, ...], ...]
  combo_weights: tuple[float, ...]
  null_keep: Ramp
  mix: Ramp

  @classmethod
  def from_config(cls, config, total_steps: int, steps_per_epoch: int) -> "Schedules":
    spe, total, pm = steps_per_epoch, total_steps, config.schedule.meta_masking.partial
    names = [n for n, _ in config_lib.enabled_components(config)]
    combos = [tuple(n in combo for n in names) for combo in pm.whitelist]
    weights = tuple(float(w) for w in pm.weights) or (1.0,) * len(combos)
    start, end = (config_lib.resolve_duration(config, f"schedule.meta_masking.partial.{k}", total,
                                              spe) for k in ("start", "end"))
    return cls(
        meta_mask=_ramp(config, "schedule.meta_masking", total, spe),
        partial=_ramp(config, "schedule.meta_masking.partial", total, spe),
        partial_start=start, partial_end=end if pm.enabled else 0,
        combos_KxC=tuple(combos), combo_weights=weights,
        null_keep=_ramp(config, "schedule.null_masking", total, spe, off=1.0),
        mix=_ramp(config, "schedule.mix.prob", total, spe))

  def partial_prob(self, step):
    """p_part inside the window, 0 outside (or with an empty whitelist)."""
    if not self.partial.enabled or not self.combos_KxC:
      return jnp.zeros((), jnp.float32)
    return jnp.where(window(step, self.partial_start, self.partial_end), self.partial(step), 0.0)

  def values(self, step) -> dict:
    """The logged schedule values at `step`."""
    return {"schedule/meta_mask_prob": self.meta_mask(step),
            "schedule/partial_mask_prob": self.partial_prob(step),
            "schedule/null_incl_prob": self.null_keep(step),
            "schedule/mix_prob": self.mix(step)}
