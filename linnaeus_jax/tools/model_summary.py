"""Builds a config's model without data and prints its size and cost as one JSON object.

    python -m linnaeus_jax.tools.model_summary --config=configs/sm.py [--config.x=v ...]

Classes come from `model.classification.heads.<task>.num_classes`, metadata widths from
`data.meta.components`. `gflops_forward` is XLA's cost analysis of the compiled forward pass for
one image at `data.img_size`; `compile_seconds` the time to lower and compile it.

Train-step memory per device (XLA's memory analysis of the compiled step; nothing allocated):

    ... --train_batch=64 --device_gib=80,141 [--headroom=0.1] --config.model.dtype=bfloat16

gives `train_step_gib` at batch 64 and `largest_batch` {device GiB: batch} for devices of 80 and
141 GiB. The analysis is this machine's backend's: run it on the target accelerator for exact
numbers (on a CPU, bfloat16 programs may keep float32 temporaries the GPU would not).
"""

from __future__ import annotations

import json
import time

from absl import flags
from ml_collections import config_flags



def count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def summary(config, train_batch: int = 0, device_gib=(), headroom: float = 0.0) -> dict:
  """The model's parameter counts, forward GFLOPs per image and compile time, and with
  `train_batch` / `device_gib` the train step's memory (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import config as config_lib, models  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  config_lib.validate(config, need_data=False)
  heads = config.model.classification.heads
  missing = [t for t in config.data.task_keys_h5 if heads[t].num_classes < 1]
  if missing:
    raise config_lib.ConfigError(
        "model_summary needs the class counts: set model.classification.heads.<task>.num_classes"
        f" for {missing}")
  comps = config_lib.enabled_components(config)
  s = config.data.img_size
  inputs = (jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
            {name: jax.ShapeDtypeStruct((1, c.dim), jnp.float32) for name, c in comps},
            jax.ShapeDtypeStruct((1, len(comps)), jnp.bool_))

  def compile_forward(cfg):
    model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    forward = lambda p, b, *x: nnx.merge(graphdef, p, b)(*x)
    t0 = time.time()
    compiled = jax.jit(forward).lower(params, buffers, *inputs).compile()
    return params, compiled, time.time() - t0

  params, compiled, seconds = compile_forward(config)
  if config.model.scan_blocks:  # XLA counts a loop body once: count FLOPs on the unrolled model
    unrolled = config_lib.with_changes(config, {"model.scan_blocks": False})
    _, compiled, _ = compile_forward(unrolled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      "params_total": count(params),
      "params_meta": count(params.get("meta_1", {})) + count(params.get("meta_2", {})),
      "params_heads": count(params["head"]),
      "gflops_forward": float(f"{float(cost.get('flops', 0.0)) / 1e9:.4g}"),
      "compile_seconds": round(seconds, 2),
  }
  if train_batch or device_gib:
    out.update(train_memory(config, train_batch, device_gib, headroom))
  return out


def train_memory(config, train_batch: int = 0, device_gib=(), headroom: float = 0.0) -> dict:
  """`train_step_gib` per device at `train_batch`, and `largest_batch` {GiB: batch} for each of
  `device_gib`, on a mesh of this machine's first device (per-device numbers)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import hardware, memory, sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.BATCH_AXES)
  out = {"dtype": hardware.compute_dtype(config.model.dtype), "remat": config.model.remat}
  cache = {}
  if train_batch:
    compiled, secs = memory.compile_train_step(config, train_batch, mesh)
    cache[train_batch] = memory.step_bytes(compiled)
    out.update(train_batch=train_batch, train_step_gib=round(cache[train_batch] / memory.GIB, 3),
               train_step_compile_seconds=round(secs, 1))
  if device_gib:
    out["largest_batch"] = {f"{g:g}": memory.largest_batch(
        config, mesh, int(g * memory.GIB), headroom, cache=cache)["batch"] for g in device_gib}
    out["headroom"] = headroom
  return out


def main(argv):
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  out = cli.call(summary, _CONFIG.value, _TRAIN_BATCH.value,
                 [float(g) for g in _DEVICE_GIB.value], _HEADROOM.value)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the tools can be imported side by side.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                            lock_config=False)
  _TRAIN_BATCH = flags.DEFINE_integer("train_batch", 0, "Train-step memory at this batch.")
  _DEVICE_GIB = flags.DEFINE_list("device_gib", [], "Largest batch for devices of these GiB.")
  _HEADROOM = flags.DEFINE_float("headroom", 0.0, "Fraction of device memory left free.")
  flags.mark_flags_as_required(["config"])
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
