"""Where metrics go: TensorBoard (tensorboardX), `metrics.jsonl`, a console progress line and,
with `logging.wandb.enabled`, a Weights & Biases run.

Only process 0 writes. Each metrics.jsonl line is {"step": int, "phase": str, "<metric>": value}.
Tags in TensorBoard and W&B are `<phase>/<metric>` (for example `val/acc1/taxa_L10`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import jax
from tensorboardX import SummaryWriter


def truncate(path: str, step: int, keep_eval_at_step: bool = True) -> int:
  """Drops the records of metrics.jsonl after `step` (and its validation records unless
  `keep_eval_at_step`); returns how many were dropped. The file is replaced atomically."""
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  def keep(line):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut by a kill
      return False
    return rec["step"] < step or (rec["step"] == step and (keep_eval_at_step
                                                           or rec["phase"] == "train"))
  kept = [l for l in lines if keep(l)]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return len(lines) - len(kept)


class MetricWriter:
  """Appends to DIR/metrics.jsonl and DIR/tensorboard.

  `resume_step`: the run continues from the checkpoint at that step, so the records of steps
  after it (written by the interrupted run past its last checkpoint) are dropped from both; with
  `redo_eval_at_resume` the validation records at that step go too (the final validation, which
  follows the last checkpoint, is run again).
  """

  def __init__(self, workdir: str, resume_step: int | None = None,
               redo_eval_at_resume: bool = False, wandb_config=None,
               run_config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.wandb = None
    if self.enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      purge = None
      if resume_step is not None:
        truncate(path, resume_step, keep_eval_at_step=not redo_eval_at_resume)
        purge = resume_step + 1  # TensorBoard hides the old events from this step on
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
      self.jsonl = open(path, "a", encoding="utf-8")
      if wandb_config is not None and wandb_config.enabled:
        self.wandb = wandb_run(workdir, wandb_config, run_config)

  def write(self, step: int, phase: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) if not isinstance(v, (int, str)) else v for k, v in metrics.items()}
    scalars = {f"{phase}/{k}": v for k, v in clean.items() if not isinstance(v, str)}
    for tag, v in scalars.items():
      self.tb.add_scalar(tag, v, step)
    if self.wandb is not None:
      self.wandb.log(scalars, step=int(step))
    self.jsonl.write(json.dumps({"step": int(step), "phase": phase, **clean}) + "\n")
    self.jsonl.flush()

  def image(self, step: int, tag: str, image_HxWx3) -> None:
    if self.enabled:
      self.tb.add_image(tag, image_HxWx3, step, dataformats="HWC")
      if self.wandb is not None:
        import wandb  # pylint: disable=g-import-not-at-top
        self.wandb.log({tag: wandb.Image(image_HxWx3)}, step=int(step))

  def text(self, step: int, tag: str, markdown: str) -> None:
    if self.enabled:
      self.tb.add_text(tag, markdown, step)

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()
      if self.wandb is not None:
        self.wandb.finish()


def wandb_run(workdir: str, cfg, run_config: dict | None):
  """The W&B run of this workdir: the same run again on resume (its id is kept in
  DIR/wandb_run_id), in DIR/wandb/. W&B drops steps at or below the last one it holds, so after
  a resume the records the interrupted run wrote past its checkpoint stay as they were there."""
  import wandb  # pylint: disable=g-import-not-at-top
  id_path = os.path.join(workdir, "wandb_run_id")
  if os.path.exists(id_path):
    with open(id_path, encoding="utf-8") as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with open(id_path, "w", encoding="utf-8") as f:
      f.write(run_id)
  return wandb.init(project=cfg.project, entity=cfg.entity or None,
                    name=cfg.name or os.path.basename(os.path.abspath(workdir)),
                    tags=list(cfg.tags) or None, id=run_id, resume="allow",
                    mode=cfg.mode or None, dir=workdir, config=run_config)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """`step/total [bar] loss img/s ETA`; redrawn in place on a terminal, one line per call else.

  Rates come from the interval since the previous update (the first one includes compilation,
  so it shows no ETA).
  """

  def __init__(self, total: int, start: int, batch_size: int, stream=sys.stderr):
    self.total, self.batch, self.stream = total, batch_size, stream
    self.tty = stream.isatty()
    self.last_step, self.last_time = start, time.time()
    self.sec_per_step = None
    self.enabled = jax.process_index() == 0

  def update(self, step: int, loss: float) -> None:
    if not self.enabled:
      return
    now = time.time()
    dt = (now - self.last_time) / max(step - self.last_step, 1)
    first = self.sec_per_step is None
    self.sec_per_step = dt if first else 0.7 * self.sec_per_step + 0.3 * dt
    self.last_step, self.last_time = step, now
    eta = "--:--" if first else _fmt_time(self.sec_per_step * (self.total - step))
    bar = "#" * int(20 * step / max(self.total, 1))
    line = (f"step {step}/{self.total} [{bar:<20}] loss {loss:.4f}  "
            f"{self.batch / max(dt, 1e-9):.1f} img/s  ETA {eta}")
    self.stream.write(("\r" + line) if self.tty else line + "\n")
    self.stream.flush()

  def newline(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()
