"""Metadata masking as pure functions of the step, evaluated inside the jitted train step.

Full masking (reference/training.md §3): each sample independently has all its components masked
with probability p_full(step), a linear ramp start_prob -> end_prob that ends at `end` steps.
Masking clears validity flags; the model then sees the component as missing (Decision 4).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from linnaeus_jax import config as config_lib


def ramp(step, p0: float, p1: float, end: int):
  """p0 + (p1 - p0) * clip(step / end, 0, 1): linear to `end`, constant afterwards."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(end, 1), 0.0, 1.0)
  return p0 + (p1 - p0) * frac


@dataclasses.dataclass(frozen=True)
class MetaMaskSchedule:
  enabled: bool
  start_prob: float
  end_prob: float
  end_step: int

  @classmethod
  def from_config(cls, config, total_steps: int, steps_per_epoch: int) -> "MetaMaskSchedule":
    mm = config.schedule.meta_masking
    end = config_lib.resolve_steps(mm.end_steps, mm.end_fraction, 0, total_steps, steps_per_epoch)
    return cls(bool(mm.enabled), float(mm.start_prob), float(mm.end_prob), end)

  def prob(self, step):
    if not self.enabled:
      return jnp.zeros((), jnp.float32)
    return ramp(step, self.start_prob, self.end_prob, self.end_step)


def full_mask(key, meta_valid_BxC, prob):
  """Clears every component of each sample with probability `prob`."""
  masked_B = jax.random.bernoulli(key, prob, (meta_valid_BxC.shape[0],))
  return meta_valid_BxC & ~masked_B[:, None]
