"""The train state: the constants the steps receive, and the state itself (create, shard,
restore). The config it is built from is resolved by `resolve.py`.

`train.py`, `evaluate.py` and the predictor import this module; it imports none of them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from linnaeus_jax import checkpoint as ckpt_lib
from linnaeus_jax import config as config_lib
from linnaeus_jax import gradnorm, losses, metrics, models, optim, sharding
from linnaeus_jax import taxonomy as taxonomy_lib
from linnaeus_jax.data import labels as labels_lib

# ----------------------------------------------------------------------------- Step constants


def loss_constants(config, data: labels_lib.Dataset) -> dict:
  """Per-task constant arrays of the loss and metrics, passed to the steps as an argument (not
  baked into the executable).

  `tax`: taxonomy smoothing matrices (C, C) of the tasks that use TaxonomyAwareLabelSmoothing;
  `class_w`: class weights (C,) from the train counts when a method is set; `lca`: heights of
  the lowest common ancestors of the finest rank's classes (C, C), for mistake severity;
  `rarity_bin`, `subset_task`, `subset_cls`: per-subset accuracy (`metrics.subset_membership`).
  """
  tasks = list(config.data.task_keys_h5)
  uses = [f == "TaxonomyAwareLabelSmoothing" for f in config.loss.task_specific.train.funcs]
  uses = [a or f == "TaxonomyAwareLabelSmoothing"
          for a, f in zip(uses, config.loss.task_specific.val.funcs)]
  ts = config.loss.taxonomy_smoothing
  enabled = [bool(e) or u for e, u in zip(list(ts.enabled) + [False] * len(tasks), uses)]
  null_class = config.data.partial.levels
  out = {"lca": jnp.asarray(metrics.lca_heights(data.taxonomy, tasks[0], null_class)),
         "rarity_bin": jnp.asarray(metrics.rarity_bins(
             np.bincount(data.train.labels[:, 0], minlength=data.num_classes[tasks[0]]),
             list(config.metrics.rarity_percentiles), null_class))}
  subsets, problems = config.metrics.taxa_subsets, []
  for name, task, taxon in subsets:
    if task not in tasks or taxon not in data.class_to_idx[task]:
      problems.append(f"metrics.taxa_subsets: {name!r}: no taxon {taxon} in {task}")
  if problems:
    raise config_lib.ConfigError("Invalid config:\n  " + "\n  ".join(problems))
  if subsets:
    out["subset_task"] = jnp.asarray([tasks.index(t) for _, t, _ in subsets], jnp.int32)
    out["subset_cls"] = jnp.asarray([data.class_to_idx[t][x] for _, t, x in subsets], jnp.int32)
  if any(enabled):
    out["tax"] = {t: jnp.asarray(m) for t, m in taxonomy_lib.smoothing_matrices(
        data.taxonomy, enabled, ts.alpha, ts.beta, ts.uniform_roots, ts.fallback_to_uniform,
        null_class=null_class).items()}
  cw = config.loss.grad_weighting["class"]
  if cw.method != "none" and (cw.train or cw.val):
    out["class_w"] = {t: jnp.asarray(losses.class_weights(
        np.bincount(data.train.labels[:, j], minlength=data.num_classes[t]), cw.method,
        smoothing_factor=cw.smoothing_factor, cap=cw.cap, base=cw.base, log_base=cw.log_base))
        for j, t in enumerate(tasks)}
  return out


# ----------------------------------------------------------------------------- State


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  `buffers` are the model's untrained constants (taxonomy matrices of hierarchical heads); the
  optimizer sees `params` only. `gradnorm` holds the task weights (`gradnorm.init_state`), which
  static weighting never changes. `nonfinite_streak` counts consecutive skipped (non-finite)
  updates, `nonfinite_skips` all of them.
  """
  params: Any
  buffers: Any
  opt_state: Any
  gradnorm: dict
  step: jax.Array
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_skips: jax.Array


def create_state(config, parents=None):
  """(graphdef, init): `init(tx)` builds a fresh `TrainState` (jit it with out_shardings to
  create it sharded); `parents` (TaxonomyTree.parents) feeds hierarchical heads."""
  graphdef, _, _ = models.abstract(config, parents)

  def init(tx):
    _, params, buffers = nnx.split(models.build(config, nnx.Rngs(config.misc.seed), parents),
                                   nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        params=params, buffers=nnx.to_pure_dict(buffers), opt_state=tx.init(params),
        gradnorm=gradnorm.init_state(len(config.data.task_keys_h5),
                                     list(config.loss.grad_weighting.task.init_weights) or None),
        step=zero, rng=jax.random.PRNGKey(config.misc.seed), nonfinite_streak=zero,
        nonfinite_skips=zero)
  return graphdef, init


def abstract_state(init, tx, mesh, config):
  """(abstract state with shardings, sharding tree) of `init(tx)` on `mesh` (`sharding.py`)."""
  shapes = jax.eval_shape(lambda: init(tx))
  shardings = sharding.state_sharding(mesh, shapes, config.mesh.fsdp_min_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings), shardings


def restore_state(config, workdir: str, parents, mesh, step: int | None = None):
  """(step, state, graphdef, state sharding) of DIR's checkpoint at `step` (default: the
  latest), for evaluation and inference (no data iterator)."""
  tx, _ = optim.build(config, 1, 1)
  graphdef, init = create_state(config, parents)
  abstract, state_sharding = abstract_state(init, tx, mesh, config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    steps = list(ckpt.manager.all_steps())
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                              f"{ckpt.directory}; steps: {steps}")
    state, _ = ckpt.restore(step, abstract, None)
  finally:
    ckpt.close()
  return step, state, graphdef, state_sharding


def is_finite(state: TrainState) -> jax.Array:
  """Whether a state is fit to checkpoint: its last step was finite (not skipped) and every
  parameter, buffer and optimizer moment is finite."""
  leaves = [x for x in jax.tree.leaves((state.params, state.buffers, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jnp.stack([jnp.isfinite(x).all() for x in leaves])
  return (state.nonfinite_streak == 0) & finite.all()


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

