"""Classification heads, one per task, by name. Output: dict task -> raw logits (B, C_task)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from linnaeus_jax.models import layers


class LinearHead(nnx.Module):
  def __init__(self, din: int, num_classes: int, rngs: nnx.Rngs):
    self.fc = layers.linear(din, num_classes, rngs)

  def __call__(self, feats_BxD):
    return self.fc(feats_BxD.astype(jnp.float32))  # logits always in float32


HEADS = {"Linear": LinearHead}


def build_heads(heads_config, task_keys, din: int, rngs: nnx.Rngs) -> nnx.Dict:
  return nnx.Dict({t: HEADS[heads_config[t].type](din, heads_config[t].num_classes, rngs)
                   for t in task_keys})
