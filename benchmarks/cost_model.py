"""Per-device memory and collective traffic of the train step on data-only and FSDP meshes.

    python benchmarks/cost_model.py [--sizes=sm,md,lg,xl] [--devices=8,64,256] [--img_size=384]
        [--per_device_batch=32] [--check=sm] [--check_devices=8] [--skip_activations]

Three tables (markdown), for choosing `mesh.data` x `mesh.fsdp` before renting a pod:

1. **State and traffic, from the shardings** (exact for the state; no device needed): the train
   state's bytes per device under `sharding.state_sharding` (parameters, optimizer moments, all of
   it), and the bytes one device sends per step under ring collectives: data-only all-reduces
   every gradient (2 (N-1)/N x P); FSDP all-gathers each sharded parameter for the forward and
   again for the backward (2 (N-1)/N x P_sharded), reduce-scatters its gradient ((N-1)/N x
   P_sharded) and all-reduces the small replicated leaves' gradients.
2. **Activations** (compiled): XLA's temporaries of the one-device train step at
   `per_device_batch` images of `img_size`, which a device of any data or FSDP mesh holds at the
   same per-device batch (FSDP adds the gathered parameters of the block in flight, not counted).
3. **Check** (compiled, `--check_devices` forced host devices): the collectives in the HLO of
   the `--check` model's unrolled train step (`scan_blocks=False`, so each op runs once a step),
   data-only and FSDP, against table 1's formula. Parameter traffic does not depend on the image
   size, so the check compiles at 64 px.

Configs as in `configs/<size>.py` with heads 684/179/40/4, bfloat16 compute, float32 state,
GradNorm off (its extra pass every `update_interval` steps is not counted).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--sizes", default="sm,md,lg,xl")
ARGS.add_argument("--devices", default="8,64,256")
ARGS.add_argument("--img_size", type=int, default=384)
ARGS.add_argument("--per_device_batch", type=int, default=32)
ARGS.add_argument("--check", default="sm", help="size for the compiled check ('' skips it)")
ARGS.add_argument("--check_devices", type=int, default=8)
ARGS.add_argument("--skip_activations", action="store_true")

if __name__ == "__main__":
  _FLAGS = ARGS.parse_args()
  if _FLAGS.check and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_FLAGS.check_devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as bench_lib  # noqa: E402
from linnaeus_jax import memory, optim, sharding  # noqa: E402
from linnaeus_jax import state as state_lib  # noqa: E402

GiB = 2**30
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1, "s64": 8, "u64": 8}


def size_config(size: str, img_size: int, batch: int = 2):
  c = bench_lib.load(size)
  for t, n in zip(c.data.task_keys_h5, bench_lib.CLASSES):
    c.model.classification.heads[t].num_classes = n
  c.data.img_size, c.data.batch_size, c.model.dtype = img_size, batch, "bfloat16"
  c.loss.grad_weighting.task.type = "static"
  return c


def state_shapes(c):
  """(params, whole train state) as ShapeDtypeStruct trees, nothing allocated."""
  tx, _ = optim.build(c, 1000, 100)
  _, init = state_lib.create_state(c)
  s = jax.eval_shape(lambda: init(tx))
  return s.params, s


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def sharded_bytes(tree, fsdp: int, min_size: int) -> tuple[int, int]:
  """(bytes of the leaves FSDP splits, bytes of those it replicates), as `sharding.py` would."""
  split = rest = 0
  for x in jax.tree.leaves(tree):
    if sharding.fsdp_spec(x.shape, fsdp, min_size) == jax.sharding.PartitionSpec():
      rest += _nbytes(x)
    else:
      split += _nbytes(x)
  return split, rest


def paper(params, state, kind: str, n: int, min_size: int) -> dict:
  """Per-device state bytes and bytes sent per step by one device (ring collectives)."""
  p_total = sum(_nbytes(x) for x in jax.tree.leaves(params))
  if kind == "data":
    return {"state": sum(_nbytes(x) for x in jax.tree.leaves(state)),
            "all-reduce": 2 * (n - 1) / n * p_total, "all-gather": 0.0, "reduce-scatter": 0.0}
  s_split, s_rest = sharded_bytes(state, n, min_size)
  p_split, p_rest = sharded_bytes(params, n, min_size)
  return {"state": s_split / n + s_rest, "all-reduce": 2 * (n - 1) / n * p_rest,
          "all-gather": 2 * (n - 1) / n * p_split, "reduce-scatter": (n - 1) / n * p_split}


_OP = re.compile(r"= (\([^=]*?\)|\S+) (all-reduce|all-gather|reduce-scatter)(?:-start)?\(")


def hlo_collectives(text: str, n: int) -> dict:
  """Bytes one device sends per step for each collective in an HLO module (ring algorithm;
  every group of size `n`), from the result shapes."""
  out = {"all-reduce": 0.0, "all-gather": 0.0, "reduce-scatter": 0.0}
  text = re.sub(r"/\*.*?\*/", "", text)  # XLA numbers long tuples: /*index=5*/
  for shapes, op in _OP.findall(text):
    size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
               for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes) if t in _BYTES)
    out[op] += {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
                "reduce-scatter": (n - 1) * size}[op]
  return out


def _mesh(data: int, fsdp: int, devices):
  return jax.sharding.Mesh(np.array(devices).reshape(data, fsdp), sharding.BATCH_AXES)


def activations(size: str, img: int, batch: int) -> tuple[float, float]:
  """(temporaries GiB of the 1-device train step at `batch`, compile s)."""
  c = size_config(size, img, batch)
  compiled, secs = memory.compile_train_step(c, batch, _mesh(1, 1, jax.devices()[:1]))
  return compiled.memory_analysis().temp_size_in_bytes / GiB, secs


def check(size: str, n: int) -> list[dict]:
  """Compiled collectives of the unrolled step on n devices, data-only and FSDP, vs paper."""
  rows = []
  for kind in ("data", "fsdp"):
    c = size_config(size, 64, 2 * n)
    c.model.scan_blocks = False
    c.mesh.data, c.mesh.fsdp = (n, 1) if kind == "data" else (1, n)
    t0 = time.time()
    compiled, _ = memory.compile_train_step(
        c, 2 * n, _mesh(c.mesh.data, c.mesh.fsdp, jax.devices()[:n]))
    params, state = state_shapes(c)
    want = paper(params, state, kind, n, c.mesh.fsdp_min_size)
    got = hlo_collectives(compiled.as_text(), n)
    got["state"] = compiled.memory_analysis().argument_size_in_bytes  # state + the small batch
    rows.append({"mesh": f"{kind}={n}", "got": got, "want": want, "s": time.time() - t0})
  return rows


def main(a):
  sizes, ns = a.sizes.split(","), [int(n) for n in a.devices.split(",")]
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, img {a.img_size}, per-device batch "
        f"{a.per_device_batch}", flush=True)
  print("\n| size | params | state GiB | mesh | state GiB / device | all-reduce GiB | all-gather GiB"
        " | reduce-scatter GiB | sent GiB / device / step |\n|---|---|---|---|---|---|---|---|---|")
  for size in sizes:
    c = size_config(size, a.img_size)
    params, state = state_shapes(c)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    total = sum(_nbytes(x) for x in jax.tree.leaves(state)) / GiB
    for kind in ("data", "fsdp"):
      for n in ns:
        r = paper(params, state, kind, n, c.mesh.fsdp_min_size)
        sent = r["all-reduce"] + r["all-gather"] + r["reduce-scatter"]
        print(f"| {size} | {n_params:,} | {total:.2f} | {kind}={n} | {r['state'] / GiB:.3f} | "
              f"{r['all-reduce'] / GiB:.3f} | {r['all-gather'] / GiB:.3f} | "
              f"{r['reduce-scatter'] / GiB:.3f} | {sent / GiB:.3f} |", flush=True)
  if not a.skip_activations:
    print(f"\n| size | temporaries GiB at {a.per_device_batch} x {a.img_size} px per device "
          "(1-device compile) | GiB per image | compile s |\n|---|---|---|---|")
    for size in sizes:
      gib, secs = activations(size, a.img_size, a.per_device_batch)
      print(f"| {size} | {gib:.2f} | {gib / a.per_device_batch:.3f} | {secs:.0f} |", flush=True)
  if a.check:
    n = min(a.check_devices, jax.device_count())
    print(f"\nCompiled check: {a.check}, unrolled, 64 px, batch {2 * n} on {n} devices; bytes "
          "sent per device per step, HLO (formula)\n\n| mesh | all-reduce MiB | all-gather MiB |"
          " reduce-scatter MiB | arguments MiB / device (state) | compile s |\n|---|---|---|---|"
          "---|---|")
    for r in check(a.check, n):
      g, w = r["got"], r["want"]
      cells = " | ".join(f"{g[k] / 2**20:,.1f} ({w[k] / 2**20:,.1f})"
                         for k in ("all-reduce", "all-gather", "reduce-scatter", "state"))
      print(f"| {r['mesh']} | {cells} | {r['s']:.0f} |", flush=True)


if __name__ == "__main__":
  main(_FLAGS)
