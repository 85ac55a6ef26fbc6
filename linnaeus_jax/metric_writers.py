"""Where metrics go: TensorBoard (tensorboardX), `metrics.jsonl` and a console progress line.

Only process 0 writes. Each metrics.jsonl line is {"step": int, "phase": str, "<metric>": value}.
Tags in TensorBoard are `<phase>/<metric>` (for example `val/acc1/taxa_L10`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, phase: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) if not isinstance(v, (int, str)) else v for k, v in metrics.items()}
    for k, v in clean.items():
      if not isinstance(v, str):
        self.tb.add_scalar(f"{phase}/{k}", v, step)
    self.jsonl.write(json.dumps({"step": int(step), "phase": phase, **clean}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """`step/total [bar] loss img/s ETA`; redrawn in place on a terminal, one line per call else."""

  def __init__(self, total: int, start: int, batch_size: int, stream=sys.stderr):
    self.total, self.start, self.batch = total, start, batch_size
    self.t0, self.stream = time.time(), stream
    self.tty = stream.isatty()
    self.last_step, self.last_time = start, self.t0
    self.enabled = jax.process_index() == 0

  def update(self, step: int, loss: float) -> None:
    if not self.enabled:
      return
    now = time.time()
    ips = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    done = (step - self.start) / max(self.total - self.start, 1)
    rate = (now - self.t0) / max(step - self.start, 1)
    eta = rate * (self.total - step)
    bar = "#" * int(20 * step / max(self.total, 1))
    line = (f"step {step}/{self.total} [{bar:<20}] loss {loss:.4f}  {ips:.1f} img/s  "
            f"ETA {_fmt_time(eta)}")
    del done
    self.stream.write(("\r" + line) if self.tty else line + "\n")
    self.stream.flush()

  def newline(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()
