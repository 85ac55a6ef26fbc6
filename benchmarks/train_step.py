"""Train-step throughput and MFU on random inputs (no input pipeline).

    python benchmarks/train_step.py --config=configs/sm.py [--config=configs/demo.py ...]
        [--batch_size=B] [--img_size=S] [--dtype=bfloat16] [--steps=10] [--peak_tflops=P]
        [--scan=true|false] [--remat=none|full|dots]

One row per config: parameters, compile seconds, step milliseconds, images/s, achieved TFLOP/s
and MFU. Training FLOPs per image are 3x the forward FLOPs that XLA's cost analysis counts on the
unrolled model (`tools/model_summary.py`): the usual forward + 2x backward estimate. MFU is
against `--peak_tflops`, else the device's dense bf16 peak from PEAK_TFLOPS (none for CPUs).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax import config as config_lib  # noqa: E402
from linnaeus_jax import masking, optim, sharding, train  # noqa: E402
from linnaeus_jax.tools import model_summary  # noqa: E402

CLASSES = (684, 179, 40, 4)  # the reference parity heads
# Dense bf16 peak TFLOP/s per chip, matched against jax's device_kind (first match wins).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0))


def load(path):
  if not path.endswith(".py"):
    path = os.path.join(ROOT, "configs", f"{path}.py")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return config_lib.load_overrides(mod.get_config())


def peak_tflops(flag: float) -> float | None:
  if flag > 0:
    return flag
  kind = jax.devices()[0].device_kind
  return next((p for k, p in PEAK_TFLOPS if k.lower() in kind.lower()), None)


def bench(c, steps):
  for t, n in zip(c.data.task_keys_h5, CLASSES):
    c.model.classification.heads[t].num_classes = n
  batch, img = c.data.batch_size, c.data.img_size
  forward = model_summary.summary(c)
  mesh = sharding.make_mesh(c)
  lr = optim.lr_schedule(c, 1000, 100)
  tx = optim.build(c, lr)
  graphdef, init = train.create_state(c, mesh)
  state = jax.jit(lambda: init(tx))()
  step = train.make_train_step(graphdef, tx, c, lr, masking.MetaMaskSchedule(True, 0.5, 0.5, 1))
  rng = np.random.default_rng(0)
  comps = config_lib.enabled_components(c)
  batch_np = {
      "image": rng.integers(0, 256, (batch, img, img, 3), dtype=np.uint8),
      "labels": {t: rng.integers(0, n, batch).astype(np.int32)
                 for t, n in zip(c.data.task_keys_h5, CLASSES)},
      "meta": {n: rng.normal(size=(batch, comp.dim)).astype(np.float32) for n, comp in comps},
      "meta_valid": np.ones((batch, len(comps)), bool),
      "example_mask": np.ones(batch, bool),
  }
  gbatch = sharding.global_batch(batch_np, mesh)
  t0 = time.time()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, gbatch).compile()
  compile_s = time.time() - t0
  state, out = compiled(state, gbatch)
  jax.block_until_ready(out["loss"])
  t0 = time.time()
  for _ in range(steps):
    state, out = compiled(state, gbatch)
  jax.block_until_ready(out["loss"])
  dt = (time.time() - t0) / steps
  tflops = 3 * forward["gflops_forward"] * batch / dt / 1e3
  return dict(img=img, batch=batch, dtype=c.model.dtype, scan=c.model.scan_blocks,
              remat=c.model.remat, params=forward["params_total"], compile_s=compile_s,
              step_ms=1000 * dt, img_s=batch / dt, tflop_s=tflops)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", action="append", help="config file or name in configs/")
  p.add_argument("--img_size", type=int, default=0, help="0: the config's own")
  p.add_argument("--batch_size", type=int, default=0, help="0: the config's own")
  p.add_argument("--dtype", default="", help="model.dtype override (float32, bfloat16)")
  p.add_argument("--scan", default="", help="model.scan_blocks override (true/false)")
  p.add_argument("--remat", default="", help="model.remat override (none, full, dots)")
  p.add_argument("--attention_impl", default="", help="model.attention_impl (xla, cudnn)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="peak for MFU; 0: known table")
  a = p.parse_args()
  peak = peak_tflops(a.peak_tflops)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.device_kind} x{jax.device_count()}; MFU peak "
        f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}")
  header = ("config", "img", "batch", "dtype", "scan", "remat", "params", "compile_s",
            "step_ms", "img_s", "tflop_s", "mfu")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for path in a.config or ["configs/demo.py"]:
    c = load(path)
    if a.img_size:
      c.data.img_size = a.img_size
    if a.batch_size:
      c.data.batch_size = a.batch_size
    if a.dtype:
      c.model.dtype = a.dtype
    if a.scan:
      c.model.scan_blocks = a.scan.lower() in ("1", "true", "yes")
    if a.remat:
      c.model.remat = a.remat
    if a.attention_impl:
      c.model.attention_impl = a.attention_impl
    r = bench(c, a.steps)
    r["config"] = os.path.basename(path).removesuffix(".py")
    r["mfu"] = f"{100 * r['tflop_s'] / peak:.1f}%" if peak else "n/a"
    r["tflop_s"] = f"{r['tflop_s']:.3g}"
    print("| " + " | ".join(f"{r[h]:,.2f}" if isinstance(r[h], float) else f"{r[h]:,}"
                            if isinstance(r[h], int) and not isinstance(r[h], bool)
                            else str(r[h]) for h in header) + " |", flush=True)


if __name__ == "__main__":
  main()
