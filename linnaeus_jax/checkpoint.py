"""Orbax checkpoints: one composite per step holding the train state, the Grain iterator state
and a JSON record of progress; asynchronous, the last `keep_last_n` kept, incomplete ones ignored.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, keep_last_n: int = 2, async_save: bool = True,
               keep_top_n: int = 0, best_mode: str = "min"):
    """Keeps the `keep_last_n` newest checkpoints and, with `keep_top_n`, the best ones by the
    `metric` passed to `save` (lowest for best_mode 'min')."""
    self.directory = os.path.abspath(directory)
    cm = ocp.checkpoint_managers
    policy = cm.LatestN(max(1, keep_last_n))
    if keep_top_n > 0:
      policy = cm.AnyPreservationPolicy([policy, cm.BestN(
          get_metric_fn=lambda m: m["metric"], reverse=best_mode == "min", n=keep_top_n,
          keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, preservation_policy=policy,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, progress: dict, metric: float | None = None):
    """Returns after the device->host copy, so the next (donating) step may run."""
    items = dict(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                      metrics=None if metric is None else {"metric": float(metric)})

  def progress(self, step: int) -> dict:
    """The JSON progress record of `step` alone."""
    return self.manager.restore(step, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore()))["progress"]

  def restore(self, step: int, abstract_state, data_iter):
    """Restores into `abstract_state`'s shapes and shardings and into `data_iter` in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore())
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out["progress"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
