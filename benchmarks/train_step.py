"""Train-step throughput and MFU on random inputs (no input pipeline).

    python benchmarks/train_step.py --config=configs/sm.py [--config=configs/demo.py ...]
        [--batch_size=B] [--img_size=S] [--dtype=bfloat16] [--steps=10] [--repeats=3]
        [--peak_tflops=P] [--scan_blocks=true|false] [--remat=none|full|dots] [--attention_impl=xla|cudnn]
        [--depthwise_impl=shift|conv] [--masking=on|off|off,on,...]

One row per config: parameters, compile seconds, step milliseconds (the fastest of `repeats`
rounds of `steps` steps), images/s, achieved TFLOP/s and MFU. `--masking=on|off` switches the
metadata masking and selective mixing of the step on or off, to measure their cost (a list
gives one row each, in one process). Training FLOPs per image are 3x the forward FLOPs that
XLA's cost analysis counts on the unrolled model (`tools/model_summary.py`): the usual forward + 2x backward estimate. MFU is
against `--peak_tflops`, else the device's dense bf16 peak from PEAK_TFLOPS (none for CPUs).
"""

from __future__ import annotations

import argparse
import itertools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax import config as config_lib  # noqa: E402
from linnaeus_jax import optim, schedules, sharding, train_step  # noqa: E402
from linnaeus_jax import state as state_lib  # noqa: E402
from linnaeus_jax.tools import model_summary  # noqa: E402

CLASSES = (684, 179, 40, 4)  # the reference parity heads
OVERRIDES = {"model.dtype": "float32, bfloat16", "model.scan_blocks": "true, false",
             "model.remat": "none, full, dots", "model.attention_impl": "xla, cudnn",
             "model.depthwise_impl": "shift, conv"}
# Dense bf16 peak TFLOP/s per chip, matched against jax's device_kind (first match wins).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0))


def load(path):
  if not path.endswith(".py"):
    path = os.path.join(ROOT, "configs", f"{path}.py")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return config_lib.with_defaults(mod.get_config())


def peak_tflops(flag: float) -> float | None:
  if flag > 0:
    return flag
  kind = jax.devices()[0].device_kind
  return next((p for k, p in PEAK_TFLOPS if k.lower() in kind.lower()), None)


def set_masking(c, on: bool):
  """on: full (p 0.5) and partial (p 0.5, every single component) metadata masking and
  selective Mixup/CutMix of every pair (p 0.5); off: none of them."""
  names = [n for n, _ in config_lib.enabled_components(c)]
  mm, mix = c.schedule.meta_masking, c.schedule.mix
  mm.enabled, mm.start_prob, mm.end_prob = on, 0.5, 0.5
  mm.partial.enabled, mm.partial.whitelist, mm.partial.weights = on, [[n] for n in names], []
  mm.partial.start_prob = mm.partial.end_prob = 0.5
  mm.partial.end_fraction = 1.0
  mix.prob.enabled, mix.prob.start_prob, mix.prob.end_prob = on, 0.5, 0.5
  mix.mixup.enabled = mix.cutmix.enabled = on
  # Plain cross-entropy, static task weights: no taxonomy here (random inputs), and GradNorm
  # runs only every update_interval steps.
  c.loss.task_specific.train.funcs = ["CrossEntropyLoss"] * len(c.data.task_keys_h5)
  c.loss.grad_weighting.task.type = "static"


def bench(c, steps, repeats=1, forward=None):
  """Times the train step of `c` on random inputs; `forward`: its model_summary, if known."""
  for t, n in zip(c.data.task_keys_h5, CLASSES):
    c.model.classification.heads[t].num_classes = n
  batch, img = c.data.batch_size, c.data.img_size
  forward = forward or model_summary.summary(c)
  mesh = sharding.make_mesh(c)
  tx, lr = optim.build(c, 1000, 100)
  graphdef, init = state_lib.create_state(c)
  state = jax.jit(lambda: init(tx))()
  step = train_step.make_train_step(graphdef, tx, train_step.StepConfig.from_config(c), lr,
                                    schedules.Schedules.from_config(c, 1000, 100))
  rng = np.random.default_rng(0)
  comps = config_lib.enabled_components(c)
  batch_np = {
      "image": rng.integers(0, 256, (batch, img, img, 3), dtype=np.uint8),
      "labels": {t: rng.integers(0, n, batch).astype(np.int32)
                 for t, n in zip(c.data.task_keys_h5, CLASSES)},
      "meta": {n: rng.normal(size=(batch, comp.dim)).astype(np.float32) for n, comp in comps},
      "meta_valid": np.ones((batch, len(comps)), bool),
      "example_mask": np.ones(batch, bool),
      "pair_ok": np.ones(batch, bool),
  }
  gbatch = sharding.global_batch(batch_np, mesh)
  t0 = time.time()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, gbatch, {}).compile()
  compile_s = time.time() - t0
  state, out = compiled(state, gbatch, {})
  jax.block_until_ready(out["loss"])
  rounds = []  # the fastest of `repeats` rounds: robust to other load on the machine
  for _ in range(repeats):
    t0 = time.time()
    for _ in range(steps):
      state, out = compiled(state, gbatch, {})
    jax.block_until_ready(out["loss"])
    rounds.append((time.time() - t0) / steps)
  dt = min(rounds)
  tflops = 3 * forward["gflops_forward"] * batch / dt / 1e3
  return dict(img=img, batch=batch, dtype=c.model.dtype, scan=c.model.scan_blocks,
              remat=c.model.remat, dw=c.model.depthwise_impl, params=forward["params_total"],
              compile_s=compile_s, step_ms=1000 * dt, img_s=batch / dt, tflop_s=tflops)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", action="append", help="config file or name in configs/")
  p.add_argument("--img_size", type=int, default=0, help="0: the config's own")
  p.add_argument("--batch_size", type=int, default=0, help="0: the config's own")
  for key, help_ in OVERRIDES.items():
    p.add_argument(f"--{key.split('.')[-1]}", default="", help=f"{key} override ({help_})")
  p.add_argument("--masking", default="on",
                 help="on | off | a list such as off,on,off,on (one row each, in one process: "
                      "compare rows of one run, processes differ by up to 10%% here)")
  p.add_argument("--steps", type=int, default=10, help="steps per timed round")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds; the fastest is reported")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="peak for MFU; 0: known table")
  a = p.parse_args()
  peak = peak_tflops(a.peak_tflops)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.device_kind} x{jax.device_count()}; MFU peak "
        f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}")
  header = ("config", "img", "batch", "dtype", "scan", "remat", "dw", "masking", "params",
            "compile_s", "step_ms", "img_s", "tflop_s", "mfu")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for path, masking in itertools.product(a.config or ["configs/demo.py"],
                                         a.masking.split(",")):
    c = load(path)
    if a.img_size:
      c.data.img_size = a.img_size
    if a.batch_size:
      c.data.batch_size = a.batch_size
    for key in OVERRIDES:
      value = getattr(a, key.split(".")[-1])
      if value:
        if key == "model.scan_blocks":
          value = value.lower() in ("1", "true", "yes")
        c.model[key.split(".")[-1]] = value
    set_masking(c, masking == "on")
    r = bench(c, a.steps, a.repeats)
    r["masking"] = masking
    r["config"] = os.path.basename(path).removesuffix(".py")
    r["mfu"] = f"{100 * r['tflop_s'] / peak:.1f}%" if peak else "n/a"
    r["tflop_s"] = f"{r['tflop_s']:.3g}"
    print("| " + " | ".join(f"{r[h]:,.2f}" if isinstance(r[h], float) else f"{r[h]:,}"
                            if isinstance(r[h], int) and not isinstance(r[h], bool)
                            else str(r[h]) for h in header) + " |", flush=True)


if __name__ == "__main__":
  main()
