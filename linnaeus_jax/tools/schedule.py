"""Writes a config's LR schedules and training probabilities, and prints its parameter groups.

    python -m linnaeus_jax.tools.schedule --config=configs/sm.py --out=DIR \
        [--steps_per_epoch=N] [--points=2000] [--config.x=v ...]

Needs no data: the total steps are `train.steps`, or `train.epochs` x `--steps_per_epoch`
(required then). Writes DIR/schedules.json
`{"steps": [...], "lr": {"<group>": [...]}, "schedule": {"<name>": [...]}}` at every step
0 .. total-1, or at `--points` evenly spaced steps when there are more, and DIR/schedules.png.
Heads whose `num_classes` is unset (0) get 2 classes, so that the parameter tree can be built.
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

PLACEHOLDER_CLASSES = 2


def steps_to_show(total: int, points: int) -> list[int]:
  """Every step when total <= points, else `points` evenly spaced steps from 0 to total-1."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if points <= 0 or total <= points:
    return list(range(total))
  return sorted({int(round(x)) for x in np.linspace(0, total - 1, points)})


def param_shapes(config):
  """The model's parameter tree as shapes (nothing allocated)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import models  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(params)


def compute(config, steps_per_epoch: int = 0, points: int = 2000) -> dict:
  """{'steps', 'lr', 'schedule', 'groups' (the group table), 'info'} for a config."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import config as config_lib, optim, schedules  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  placeholders = []
  for name, head in config.model.classification.heads.items():
    if head.num_classes < 1:
      head.num_classes = PLACEHOLDER_CLASSES
      placeholders.append(name)
  config_lib.validate(config, need_data=False)
  if config.train.steps <= 0 and steps_per_epoch < 1:
    raise config_lib.ConfigError("train.steps is unset: pass --steps_per_epoch to resolve "
                                 "train.epochs (and *_epochs durations) to steps")
  spe = max(steps_per_epoch, 1)
  total = config_lib.total_steps(config, spe)
  steps = np.asarray(steps_to_show(total, points), np.int32)
  lrs = optim.lr_schedules(config, total, spe)
  scheds = schedules.Schedules.from_config(config, total, spe)
  values = jax.jit(jax.vmap(lambda t: ({k: f(t) for k, f in lrs.items()}, scheds.values(t))))
  lr, probs = jax.device_get(values(steps))
  spec = optim.lr_spec(config, total, spe)
  return {
      "steps": steps.tolist(),
      # In group order (jax returns dicts sorted by key).
      "lr": {k: np.asarray(lr[k], np.float64).tolist() for k in lrs},
      "schedule": {k: np.asarray(probs[k], np.float64).tolist() for k in scheds.values(0)},
      "groups": optim.group_table(config, param_shapes(config)),
      "info": {"total_steps": total, "steps_per_epoch": spe, "warmup_steps": spec.warmup,
               "schedule": spec.name, "batch_factor": spec.factor,
               "placeholder_heads": placeholders},
  }


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_lr, ax_p) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
  for name, values in result["lr"].items():
    ax_lr.plot(result["steps"], values, label=name)
  peaks = [max(v) for v in result["lr"].values()]
  if min(peaks) > 0 and max(peaks) / min(peaks) > 10:  # groups far apart: log scale
    ax_lr.set_yscale("log")
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_title(f"{result['info']['schedule']}, warmup {result['info']['warmup_steps']} of "
                  f"{result['info']['total_steps']} steps")
  ax_lr.legend(fontsize="small")
  for name, values in result["schedule"].items():
    ax_p.plot(result["steps"], values, label=name.removeprefix("schedule/"))
  ax_p.set_ylabel("probability")
  ax_p.set_ylim(-0.05, 1.05)
  ax_p.set_xlabel("step (optimizer updates)")
  ax_p.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(config, out: str, steps_per_epoch: int = 0, points: int = 2000) -> dict:
  """Writes out/schedules.json and out/schedules.png; returns the computed result."""
  result = compute(config, steps_per_epoch, points)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "schedules.json"), "w") as f:
    json.dump({k: result[k] for k in ("steps", "lr", "schedule")}, f)
  plot(result, os.path.join(out, "schedules.png"))
  return result


def report(result: dict) -> str:
  from linnaeus_jax import optim  # pylint: disable=g-import-not-at-top
  i = result["info"]
  peaks = ", ".join(f"{k} {max(v):.3g}" for k, v in result["lr"].items())
  return (f"total steps {i['total_steps']}, warmup {i['warmup_steps']}, schedule {i['schedule']}, "
          f"batch factor {i['batch_factor']:g}\npeak LR: {peaks}\n\n"
          + optim.format_table(result["groups"])
          + (f"\n(heads with {PLACEHOLDER_CLASSES} placeholder classes: "
             f"{', '.join(i['placeholder_heads'])})" if i["placeholder_heads"] else ""))


def main(argv):
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  result = cli.call(write, _CONFIG.value, _OUT.value, _SPE.value, _POINTS.value)
  print(report(result))
  print(f"\nwrote {os.path.join(_OUT.value, 'schedules.json')} and schedules.png")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the tools can be imported side by side.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                            lock_config=False)
  _OUT = flags.DEFINE_string("out", None, "Output directory.")
  _SPE = flags.DEFINE_integer("steps_per_epoch", 0,
                              "Steps per epoch (required when train.steps is unset).")
  _POINTS = flags.DEFINE_integer("points", 2000, "At most this many steps (evenly spaced).")
  flags.mark_flags_as_required(["config", "out"])
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
