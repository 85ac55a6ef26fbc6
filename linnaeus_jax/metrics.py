"""Evaluation metrics as counts computed inside jit and summed on the host.

Per task: top-1 correct and loss sums over real examples (`example_mask`); chain accuracy counts
samples whose every task is correct. Accuracies are reported in percent, as in the original.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def batch_counts(logits: dict, labels: dict, per_task_loss: dict, example_mask_B, task_keys):
  m = example_mask_B.astype(jnp.float32)
  counts = {"n": jnp.sum(m)}
  all_correct = jnp.ones_like(example_mask_B)
  for t in task_keys:
    correct = jnp.argmax(logits[t], -1) == labels[t]
    all_correct &= correct
    counts[f"correct1/{t}"] = jnp.sum(m * correct)
    counts[f"loss_sum/{t}"] = jnp.sum(m * per_task_loss[t][1])
  counts["chain_correct"] = jnp.sum(m * all_correct)
  return counts


def accumulate(total: dict | None, counts: dict) -> dict:
  counts = {k: float(np.asarray(v)) for k, v in counts.items()}
  if total is None:
    return counts
  return {k: total[k] + counts[k] for k in total}


def finalize(total: dict, task_keys) -> dict:
  n = max(total["n"], 1.0)
  out = {"loss": sum(total[f"loss_sum/{t}"] for t in task_keys) / n}
  for t in task_keys:
    out[f"acc1/{t}"] = 100.0 * total[f"correct1/{t}"] / n
    out[f"loss/{t}"] = total[f"loss_sum/{t}"] / n
  out["chain_accuracy"] = 100.0 * total["chain_correct"] / n
  out["num_examples"] = int(total["n"])
  return out
