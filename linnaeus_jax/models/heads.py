"""Classification heads (docs/model.md#heads, docs/design.md#hierarchical-heads-that-refine).

Output: dict task -> logits (B, C). Every task has one Dense `head.<task>.fc` on the fused
features, computed once. A task whose head is hierarchical (HierarchicalSoftmax,
ConditionalClassifier) then has its logits refined top-down from the coarsest rank:

    z~_c = z_c + log(route_c(z~_p) @ H_pc + 1e-10),   p = the next coarser task,

with H_pc[p, c] = 1 iff p is c's parent in the taxonomy; a child class without a parent (the null
class, an unknown link) gets an all-ones column and stays unrefined. `route_c` is the child's
routing: softmax(z / T) ('soft', always for HierarchicalSoftmax), one-hot argmax ('hard', eval
only) or Gumbel-softmax ('gumbel', train only); other mode combinations fall back to soft.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax.config import HEAD_TYPES
from linnaeus_jax.models import layers

HIERARCHICAL = tuple(t for t in HEAD_TYPES if t != "Linear")


class TaskHead(nnx.Module):
  def __init__(self, din: int, num_classes: int, rngs: nnx.Rngs):
    self.fc = layers.linear(din, num_classes, rngs)

  def __call__(self, feats_BxD):
    return self.fc(feats_BxD.astype(jnp.float32))  # logits always in float32


def build_heads(heads_config, task_keys, din: int, rngs: nnx.Rngs) -> nnx.Dict:
  return nnx.Dict({t: TaskHead(din, heads_config[t].num_classes, rngs) for t in task_keys})


def hierarchy_matrix(parents_C: np.ndarray, num_parents: int) -> np.ndarray:
  """H (num_parents, C): H[p, c] = 1 iff parents_C[c] == p; all-ones columns where unknown (-1)."""
  h = np.zeros((num_parents, len(parents_C)), np.float32)
  known = parents_C >= 0
  h[parents_C[known], np.flatnonzero(known)] = 1.0
  h[:, ~known] = 1.0
  return h


def route(logits_BxC, strategy: str, temperature: float, train: bool, key=None):
  """Routing probabilities over the parent classes."""
  z = logits_BxC.astype(jnp.float32)
  if strategy == "hard" and not train:
    return jax.nn.one_hot(jnp.argmax(z, -1), z.shape[-1], dtype=jnp.float32)
  if strategy == "gumbel" and train and key is not None:
    z = z + jax.random.gumbel(key, z.shape, jnp.float32)
  return jax.nn.softmax(z / temperature, axis=-1)


class Hierarchy(nnx.Module):
  """Top-down refinement of the hierarchical tasks' logits; the H matrices are Buffers."""

  def __init__(self, heads_config, task_keys, parents: dict[str, np.ndarray] | None = None):
    """`parents[child]`: (C_child,) parent class at the next coarser task or -1 (`TaxonomyTree`).

    Without `parents` (a model built without data) every column is all ones: no refinement.
    """
    self.task_keys = tuple(task_keys)
    routing, matrices = [], {}
    for child, parent in zip(task_keys, task_keys[1:]):
      h = heads_config[child]
      if h.type not in HIERARCHICAL:
        continue
      n_child = heads_config[child].num_classes
      par = (np.asarray(parents[child]) if parents is not None
             else np.full(n_child, -1, np.int32))
      if len(par) != n_child:
        raise ValueError(f"taxonomy has {len(par)} {child} classes, the head {n_child}")
      matrices[child] = layers.Buffer(jnp.asarray(
          hierarchy_matrix(par, heads_config[parent].num_classes)))
      strategy = "soft" if h.type == "HierarchicalSoftmax" else h.get("routing_strategy", "soft")
      routing.append((child, parent, strategy, float(h.get("temperature", 1.0))))
    self.routing = tuple(reversed(routing))  # coarsest child first
    self.matrices = nnx.Dict(matrices)

  def __call__(self, logits: dict, *, train: bool = False, key=None) -> dict:
    out = dict(logits)
    for i, (child, parent, strategy, temperature) in enumerate(self.routing):
      k = None if key is None else jax.random.fold_in(key, i)
      probs_BxP = route(out[parent], strategy, temperature, train, k)
      mass_BxC = jnp.matmul(probs_BxP, self.matrices[child][...],
                            precision=jax.lax.Precision.HIGHEST)
      out[child] = logits[child] + jnp.log(mass_BxC + 1e-10)
    return out
