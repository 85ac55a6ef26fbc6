"""Preemption: SIGTERM makes the training loop save a checkpoint at a step boundary and exit 0.

One process: a Python SIGTERM handler sets a flag, read after each step. Several processes: JAX's
preemption sync service (started by `jax.distributed.initialize`) catches the signal on any host
and agrees on one step at which every process saves, so that the collective save cannot hang.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Raised by `train.run` after the SIGTERM checkpoint is saved (main exits with
  `--preempted_exit_code`, default 0)."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}")
    self.step = step


class Watch:
  """`reached(step)` turns True at the step where the run should save and stop."""

  def __init__(self):
    self.signalled = False
    self.multi = jax.process_count() > 1
    self._previous = None
    if not self.multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.signalled = True

  def reached(self, step: int) -> bool:
    """Called by every process after every step with the same `step`."""
    if self.multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off
        return False
    return self.signalled

  def close(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
