"""Builds a config's model without data and prints its size and cost as one JSON object.

    python -m linnaeus_jax.tools.model_summary --config=configs/sm.py [--config.x=v ...]

Classes come from `model.classification.heads.<task>.num_classes`, metadata widths from
`data.meta.components`. `gflops_forward` is XLA's cost analysis of the compiled forward pass for
one image at `data.img_size`; `compile_seconds` the time to lower and compile it.
"""

from __future__ import annotations

import json
import time

from absl import flags
from ml_collections import config_flags



def count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def summary(config) -> dict:
  """The model's parameter counts, forward GFLOPs per image and compile time (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import config as config_lib, models  # pylint: disable=g-import-not-at-top
  config = config_lib.load_overrides(config)
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
    unrolled = config_lib.load_overrides(config)
    unrolled.model.scan_blocks = False
    _, compiled, _ = compile_forward(unrolled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "params_total": count(params),
      "params_meta": count(params.get("meta_1", {})) + count(params.get("meta_2", {})),
      "params_heads": count(params["head"]),
      "gflops_forward": round(float(cost.get("flops", 0.0)) / 1e9, 3),
      "compile_seconds": round(seconds, 2),
  }


def main(argv):
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  out = cli.call(summary, _CONFIG.value)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the tools can be imported side by side.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                            lock_config=False)
  flags.mark_flags_as_required(["config"])
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
