"""Train-step throughput on random inputs (no input pipeline), one row per model config.

    python benchmarks/train_step.py [--configs=demo,sm] [--img_size=224] [--batch=32] [--steps=10]

Prints: config, image size, batch, parameters, compile seconds, step milliseconds, img/s and the
XLA cost-analysis GFLOPs per training step (forward + backward + update).
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

CLASSES = (684, 179, 40, 4)  # the reference parity heads


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def bench(name, img_size, batch, steps, dtype):
  c = config_lib.load_overrides(load(name))
  c.data.img_size, c.data.batch_size, c.model.dtype = img_size, batch, dtype
  for t, n in zip(c.data.task_keys_h5, CLASSES):
    c.model.classification.heads[t].num_classes = n
  mesh = sharding.make_mesh(c)
  lr = optim.lr_schedule(c, 1000, 100)
  tx = optim.build(c, lr)
  graphdef, init = train.create_state(c, mesh)
  state = jax.jit(lambda: init(tx))()
  n_params = train.count_params(state["params"])
  step = train.make_train_step(graphdef, tx, c, lr, masking.MetaMaskSchedule(True, 0.5, 0.5, 1))
  rng = np.random.default_rng(0)
  comps = config_lib.enabled_components(c)
  batch_np = {
      "image": rng.integers(0, 256, (batch, img_size, img_size, 3), dtype=np.uint8),
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
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  gflops = float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan")
  state, out = compiled(state, gbatch)
  jax.block_until_ready(out["loss"])
  t0 = time.time()
  for _ in range(steps):
    state, out = compiled(state, gbatch)
  jax.block_until_ready(out["loss"])
  dt = (time.time() - t0) / steps
  return dict(config=name, img=img_size, batch=batch, dtype=dtype, params=n_params,
              compile_s=compile_s, step_ms=1000 * dt, img_s=batch / dt, gflop_step=gflops)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--configs", default="demo,sm")
  p.add_argument("--img_size", type=int, default=0, help="0: each config's own size")
  p.add_argument("--batch", type=int, default=0, help="0: each config's own batch")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32")
  a = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
  header = ("config", "img", "batch", "dtype", "params", "compile_s", "step_ms", "img_s",
            "gflop_step")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for name in a.configs.split(","):
    c = load(name)
    r = bench(name, a.img_size or c.data.img_size, a.batch or c.data.batch_size, a.steps, a.dtype)
    print("| " + " | ".join(f"{r[h]:,.1f}" if isinstance(r[h], float) else f"{r[h]:,}"
                            if isinstance(r[h], int) else str(r[h]) for h in header) + " |",
          flush=True)


if __name__ == "__main__":
  main()
