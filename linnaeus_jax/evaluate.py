"""Validation: the eval step (no masking, no augmentation) and a pass over a dataset."""

from __future__ import annotations

from flax import nnx

from linnaeus_jax import losses, metrics, preprocessing, sharding


def make_eval_step(graphdef, config):
  tasks = list(config.data.task_keys_h5)
  funcs = list(config.loss.task_specific.val.funcs)

  def step(variables, batch):
    """`variables`: (params, buffers) as split by `train.create_state`."""
    image = preprocessing.normalize(batch["image"])
    logits = nnx.merge(graphdef, *variables)(image, batch["meta"], batch["meta_valid"],
                                             train=False)
    per_task = losses.task_losses(logits, batch["labels"], tasks, funcs,
                                  smoothing=config.model.label_smoothing,
                                  partial_levels=config.data.partial.levels,
                                  mask_nulls=config.train.phase1_mask_null_loss,
                                  example_mask_B=batch["example_mask"])
    return metrics.batch_counts(logits, batch["labels"], per_task, batch["example_mask"], tasks)
  return step


def run(eval_step, variables, dataset, mesh, tasks) -> dict:
  total = None
  for batch in dataset:
    total = metrics.accumulate(total, eval_step(variables, sharding.global_batch(batch, mesh)))
  return metrics.finalize(total, tasks)
