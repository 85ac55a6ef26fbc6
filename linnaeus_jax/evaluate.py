"""Validation: the eval step (no masking, no augmentation) and a pass over a dataset."""

from __future__ import annotations

from flax import nnx

from linnaeus_jax import losses, metrics, preprocessing, sharding


def make_eval_step(graphdef, config):
  tasks = list(config.data.task_keys_h5)
  funcs = list(config.loss.task_specific.val.funcs)
  use_class_w = config.loss.grad_weighting["class"].val

  def step(variables, batch, consts):
    """`variables`: (params, buffers) as split by `train.create_state`; `consts` from
    `train.loss_constants` (taxonomy matrices, class weights)."""
    image = preprocessing.normalize(batch["image"])
    logits = nnx.merge(graphdef, *variables)(image, batch["meta"], batch["meta_valid"],
                                             train=False)
    per_task = losses.task_losses(logits, batch["labels"], tasks, funcs,
                                  smoothing=config.model.label_smoothing,
                                  partial_levels=config.data.partial.levels,
                                  mask_nulls=config.train.phase1_mask_null_loss,
                                  example_mask_B=batch["example_mask"],
                                  tax_matrices=consts.get("tax"),
                                  class_weights=consts.get("class_w") if use_class_w else None)
    return metrics.batch_counts(logits, batch["labels"], per_task, batch["example_mask"], tasks)
  return step


def run(eval_step, variables, dataset, mesh, tasks, consts=None) -> dict:
  total, consts = None, consts or {}
  for batch in dataset:
    total = metrics.accumulate(total, eval_step(variables, sharding.global_batch(batch, mesh),
                                                consts))
  return metrics.finalize(total, tasks)
