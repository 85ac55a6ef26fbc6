"""Validation: deterministic metadata-masked passes, computed together in one pass over the data.

A phase is (name, components masked). `val` masks nothing, `val_mask_meta` everything, a
`val_mask_<A>_<B>` phase the listed components (reference/training.md §11, Decision 7: columns of
the packing table, i.e. validity flags, never value slices). One jitted call evaluates every
phase of a batch: the model is `vmap`ped over the phases' validity flags, so the ConvNeXt stages,
which do not see metadata, run once per batch. No augmentation, no random masking.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax import config as config_lib
from linnaeus_jax import losses, metrics, preprocessing, sharding


def phase_name(masked: tuple[str, ...], all_names: tuple[str, ...]) -> str:
  if not masked:
    return "val"
  if set(masked) == set(all_names):
    return "val_mask_meta"
  return "val_mask_" + "_".join(masked)


def phases(config, *, mask_meta=True, partial=False, exhaustive=False) -> tuple:
  """((name, masked component names), ...) for the requested kinds of pass, without repeats.

  partial: one per `schedule.validation.partial_mask_meta.whitelist` entry (listed order);
  exhaustive: every non-empty proper subset of `final_epoch.exhaustive_meta_components` (default:
  all enabled components), in idx order: 2^n - 2 passes.
  """
  names = tuple(n for n, _ in config_lib.enabled_components(config))
  v = config.schedule.validation
  out = [()]
  if mask_meta and names:
    out.append(names)
  if partial:
    out += [tuple(c) for c in v.partial_mask_meta.whitelist]
  if exhaustive and names:
    pool = [n for n in names if n in (v.final_epoch.exhaustive_meta_components or names)]
    out += [c for r in range(1, len(pool)) for c in itertools.combinations(pool, r)]
  named = {}
  for masked in out:
    named.setdefault(phase_name(masked, names), masked)
  return tuple(named.items())


def make_eval_step(graphdef, config, phase_list=(("val", ()),)):
  """step(variables, batch, consts) -> {phase: (counts, confusion counts of the coarsest rank)}.

  `variables`: (params, buffers) as split by `train.create_state`; `consts` from
  `train.loss_constants` (taxonomy matrices, class weights).
  """
  tasks = list(config.data.task_keys_h5)
  funcs = list(config.loss.task_specific.val.funcs)
  use_class_w = config.loss.grad_weighting["class"].val
  names = [n for n, _ in config_lib.enabled_components(config)]
  masks_KxC = np.array([[n in masked for n in names] for _, masked in phase_list],
                       bool).reshape(len(phase_list), len(names))

  def step(variables, batch, consts):
    image = preprocessing.normalize(batch["image"])
    valid_KxBxC = batch["meta_valid"][None] & ~jnp.asarray(masks_KxC)[:, None, :]

    def forward(valid_BxC):
      logits = nnx.merge(graphdef, *variables)(image, batch["meta"], valid_BxC, train=False)
      per_task = losses.task_losses(
          logits, batch["labels"], tasks, funcs, smoothing=config.model.label_smoothing,
          partial_levels=config.data.partial.levels,
          mask_nulls=config.train.phase1_mask_null_loss, example_mask_B=batch["example_mask"],
          tax_matrices=consts.get("tax"),
          class_weights=consts.get("class_w") if use_class_w else None)
      counts = metrics.batch_counts(logits, batch["labels"], per_task, batch["example_mask"],
                                    tasks, partial_levels=config.data.partial.levels,
                                    lca_CxC=consts.get("lca"))
      coarse = tasks[-1]  # confusion counts of the coarsest rank, for the plots
      c = logits[coarse].shape[-1]
      true_BxC = jax.nn.one_hot(batch["labels"][coarse], c) * batch["example_mask"][:, None]
      pred_BxC = jax.nn.one_hot(jnp.argmax(logits[coarse], -1), c)
      return counts, jnp.einsum("bi,bj->ij", true_BxC, pred_BxC)
    counts, confusion_KxCxC = jax.vmap(forward)(valid_KxBxC)
    return {name: (jax.tree.map(lambda x, k=k: x[k], counts), confusion_KxCxC[k])
            for k, (name, _) in enumerate(phase_list)}
  return step


def run(eval_step, variables, dataset, mesh, tasks, consts=None, confusion=None) -> dict:
  """{phase: metrics} over `dataset` (counts summed over batches, then finalized).

  `confusion`, a dict, receives {phase: (C, C) counts} of the coarsest rank (rows: true class).
  """
  totals, conf, consts = {}, {}, consts or {}
  for batch in dataset:
    out = eval_step(variables, sharding.global_batch(batch, mesh), consts)
    totals = {p: metrics.accumulate(totals.get(p), c) for p, (c, _) in out.items()}
    conf = {p: conf.get(p, 0) + np.asarray(m, np.int64) for p, (_, m) in out.items()}
  if confusion is not None:
    confusion.update(conf)
  return {p: metrics.finalize(t, tasks) for p, t in totals.items()}
