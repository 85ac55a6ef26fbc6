"""Orbax checkpoints: one composite per step holding the train state, the Grain iterator state
and a JSON record of progress; asynchronous, incomplete ones ignored.

Only good states are kept: a new checkpoint is *provisional* until the training step after it
came out finite (`confirm`), and is deleted if it did not (`discard`). The `keep_last_n` newest
confirmed checkpoints are kept, so a diverging run never rotates the last good ones out. A damaged
or mismatched checkpoint is a `CheckpointError` naming the step and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored (damaged, or saved for another model or state)."""


@dataclasses.dataclass
class _LatestConfirmedN:
  """Orbax preservation policy: the `n` newest confirmed checkpoints and every provisional one."""
  n: int
  provisional: set

  def should_preserve(self, checkpoints, *, context):
    del context
    confirmed = [c.step for c in checkpoints if c.step not in self.provisional]
    keep = set(confirmed[-self.n:]) | self.provisional
    return [c.step in keep for c in checkpoints]


def saved_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory` (folders named by their step), from
  a listing alone."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _tree_problems(saved, wanted) -> list[str]:
  """Where the saved state's leaves (Orbax metadata) and the wanted one's differ."""
  path = lambda kp: jax.tree_util.keystr(kp, simple=True, separator="/")
  saved = {path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  wanted = {path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(wanted)[0]}
  out = [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
  out += [f"{k}: in the checkpoint, not in this model" for k in saved if k not in wanted]
  for k in wanted.keys() & saved.keys():
    a, b = getattr(saved[k], "shape", None), wanted[k].shape
    if a is not None and tuple(a) != tuple(b):
      out.append(f"{k}: checkpoint {tuple(a)}, this config {tuple(b)}")
  return sorted(out)


class Checkpointer:

  def __init__(self, directory: str, keep_last_n: int = 2, async_save: bool = True,
               keep_top_n: int = 0, best_mode: str = "min"):
    """Keeps the `keep_last_n` newest confirmed checkpoints and, with `keep_top_n`, the best
    ones by the `metric` passed to `save` (lowest for best_mode 'min')."""
    self.directory = os.path.abspath(directory)
    self.provisional = set()
    cm = ocp.checkpoint_managers
    policy = _LatestConfirmedN(max(1, keep_last_n), self.provisional)
    if keep_top_n > 0:
      policy = cm.AnyPreservationPolicy([policy, cm.BestN(
          get_metric_fn=lambda m: m["metric"], reverse=best_mode == "min", n=keep_top_n,
          keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, preservation_policy=policy,
        cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}  # known before any restore
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter, progress: dict, metric: float | None = None,
           provisional: bool = False):
    """Returns after the device->host copy, so the next (donating) step may run. A
    `provisional` checkpoint waits for `confirm` or `discard`."""
    items = dict(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if provisional:
      self.provisional.add(step)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                      metrics=None if metric is None else {"metric": float(metric)})

  def confirm(self) -> None:
    """The provisional checkpoints were followed by a finite step: they are good."""
    self.provisional.clear()

  def discard(self) -> list[int]:
    """Deletes the provisional checkpoints (their state gave a non-finite step); returns them."""
    self.wait()
    gone = sorted(self.provisional)
    for step in gone:
      self.manager.delete(step)
    self.provisional.clear()
    return gone

  def progress(self, step: int) -> dict:
    """The JSON progress record of `step` alone."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          progress=ocp.args.JsonRestore()))["progress"]
    except Exception as e:  # pylint: disable=broad-except  (any damage: Orbax raises many kinds)
      raise self._damaged(step, f"progress record unreadable ({_first_line(e)})") from None

  def check(self, step: int, abstract_state) -> None:
    """Raises CheckpointError if checkpoint `step` is damaged (from its files and metadata) or
    was saved for another model or train state than `abstract_state`."""
    folder = os.path.join(self.directory, str(step))
    missing = [d for d in ("state", "progress") if not os.path.isdir(os.path.join(folder, d))]
    if missing:
      raise self._damaged(step, f"the step folder lacks {', '.join(missing)}", abstract_state)
    try:
      meta = self.manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except  (any damage: Orbax raises many kinds)
      raise self._damaged(step, f"state metadata unreadable ({_first_line(e)})",
                          abstract_state) from None
    if meta is None:
      raise self._damaged(step, "state metadata missing", abstract_state)
    if (diff := _tree_problems(getattr(meta, "tree", meta), abstract_state)):
      more = f"; ... ({len(diff)} in all)" if len(diff) > 8 else ""
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} was saved for another model or "
          f"train state: {'; '.join(diff[:8])}{more}. Resume with the config it was saved with "
          "(DIR/config.json) or use a new --workdir")

  def restore(self, step: int, abstract_state, data_iter):
    """Restores into `abstract_state`'s shapes and shardings and into `data_iter` in place."""
    self.check(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore())
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      _quiet_abandoned_reads()
      raise self._damaged(step, f"its data is unreadable, a file truncated or corrupt? "
                          f"({_first_line(e)})", abstract_state) from None
    return out["state"], out["progress"]

  def _damaged(self, step: int, problem: str, abstract_state=None) -> CheckpointError:
    """The error for a damaged `step`, naming the previous intact step to resume from."""
    hint = "no earlier checkpoint to resume from: start over in a new --workdir"
    for prev in reversed([s for s in self.steps() if s < step]):
      if abstract_state is None or self._intact(prev, abstract_state):
        hint = (f"resume from step {prev} with --config.train.resume_step={prev} (the steps "
                f"after it are moved to {self.directory}_set_aside)")
        break
    return CheckpointError(f"the checkpoint at step {step} in {self.directory} is damaged: "
                           f"{problem}; {hint}")

  def _intact(self, step: int, abstract_state) -> bool:
    try:
      self.check(step, abstract_state)
      self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
      return True
    except Exception:  # pylint: disable=broad-except
      _quiet_abandoned_reads()
      return False

  def set_aside_after(self, step: int, abstract_state) -> list[int]:
    """For `train.resume_step`: moves the checkpoints after `step`, all damaged, to
    DIR_set_aside/ (nothing is deleted) and returns them; with an intact one among them (the run
    has moved on since), moves nothing and returns []."""
    if step not in self.steps():
      raise CheckpointError(f"train.resume_step={step}: no such checkpoint in {self.directory}; "
                            f"steps: {self.steps()}")
    later = [s for s in self.steps() if s > step]
    if any(self._intact(s, abstract_state) for s in later):
      return []
    if jax.process_index() == 0:
      for s in later:
        dest = os.path.join(f"{self.directory}_set_aside", str(s))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(s)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints set aside")
    self.manager.reload()
    return later

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Closes; when the run is already failing, a failure to close (Orbax's executor shut
    down) is logged, not raised over the error that ended the run."""
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("closing the checkpointer after an error: %s", e)


def _abandoned_read(exc) -> bool:
  """The errors that the reads still in flight when a restore fails raise later, in threads and
  coroutines nobody awaits (asyncio's closed loop, TensorStore's read errors)."""
  text = str(exc)
  return text == "Event loop is closed" or text.startswith("Encountered error while reading")


def _quiet_abandoned_reads() -> None:
  """Once a restore has failed (and is reported as one CheckpointError), its abandoned reads
  print nothing: thousands of traceback lines otherwise follow the one error line."""
  if getattr(sys.excepthook, "quiet_abandoned_reads", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(typ, value, tb):
    if not _abandoned_read(value):
      excepthook(typ, value, tb)

  def quiet_unraisablehook(u):
    if not (_abandoned_read(u.exc_value) or _abandoned_read(u.exc_value.__cause__ or "")):
      unraisablehook(u)

  quiet_excepthook.quiet_abandoned_reads = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _first_line(e: Exception) -> str:
  """The gist of an Orbax/TensorStore error, on one line."""
  text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
