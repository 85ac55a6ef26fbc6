"""python -m linnaeus_jax.export --workdir=DIR --out=BUNDLE [--step=N]: an inference bundle.

The bundle (layout in bundle.py, docs/inference.md) holds the parameters, config, taxonomy,
class map, the preprocessing record and `model.jax_exported`: the forward pass serialised with
`jax.export` for a symbolic batch size, callable from a bare `jax` install:

  exp = jax.export.deserialize(open("BUNDLE/model.jax_exported", "rb").read())
  logits = exp.call(dict(np.load("BUNDLE/params.npz")), images_u8_BxSxSx3, meta, meta_valid_BxC)

`python -m linnaeus_jax.inference.export` is the same command.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax import models, preprocessing
from linnaeus_jax.inference import bundle as bundle_lib
from linnaeus_jax.inference import card as card_lib

PLATFORMS = ("cpu", "cuda", "tpu")


def export_forward(config, variables: dict, record: dict,
                   platforms=PLATFORMS) -> jax.export.Exported:
  """f(params, images, meta, meta_valid) -> {task: logits (b, C) float32}, b symbolic.

  params: the flat {"params/...": array, "buffers/...": array} of params.npz; images: (b, S, S, 3)
  uint8 RGB as `preprocessing.to_rgb_uint8` makes them (scaled to [0, 1] and standardised with
  the record's mean/std inside); meta: {component: (b, dim) float32};
  meta_valid: (b, components) bool, components in preprocessing.json's order.
  """
  graphdef, _, _ = models.abstract(config)
  mean, std = preprocessing.recorded_stats(record)  # baked in, as the Predictor applies them

  def forward(flat, image_u8, meta, valid):
    v = bundle_lib.unflatten(flat)
    model = nnx.merge(graphdef, v.get("params", {}), v.get("buffers", {}))
    logits = model(preprocessing.normalize(image_u8, mean, std), meta, valid, train=False)
    return {t: x.astype(jnp.float32) for t, x in logits.items()}

  b, s = jax.export.symbolic_shape("b")[0], int(record["image"]["size"])
  flat = {k: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
          for k, x in bundle_lib.flatten(variables).items()}
  comps = record["metadata"]
  args = (flat, jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
          {c["name"]: jax.ShapeDtypeStruct((b, c["dim"]), jnp.float32) for c in comps},
          jax.ShapeDtypeStruct((b, len(comps)), jnp.bool_))
  return jax.export.export(jax.jit(forward), platforms=platforms)(*args)


def export_workdir(workdir: str, out: str, step: int | None = None,
                   platforms=PLATFORMS) -> str:
  """Writes the bundle of DIR's checkpoint at `step` (default: latest); returns `out`."""
  from linnaeus_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  w = predictor.load_workdir(workdir, step)
  exported = export_forward(w["config"], w["variables"], w["preprocessing"], platforms)
  info = {"source_workdir": os.path.abspath(workdir), "step": int(w["step"]),
          "platforms": list(platforms)}
  facts_path = os.path.join(workdir, "assets", "data_summary.json")
  facts = bundle_lib.read_json(facts_path, dict) if os.path.exists(facts_path) else None
  now = datetime.datetime.now(datetime.timezone.utc)
  card = card_lib.build(
      w["config"], w["preprocessing"], w["variables"], facts,
      card_lib.final_validation(os.path.join(workdir, "metrics.jsonl"), int(w["step"])),
      {**info, "created": now.isoformat(timespec="seconds"),
       "linnaeus_jax": importlib.metadata.version("linnaeus_jax"), "jax": jax.__version__})
  bundle_lib.write(out, w["config"], w["variables"], w["preprocessing"], w["class_maps"],
                   w["taxonomy_json"], info, bytes(exported.serialize()),
                   {"card.json": json.dumps(card, indent=1), "README.md": card_lib.markdown(card)})
  return out


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  f = flags.FLAGS
  out = cli.call(export_workdir, f.workdir, f.out, f.step, tuple(f.platforms))
  size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
  print(f"wrote {out} ({size / 2**20:.1f} MiB): {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, assets/, checkpoints/).")
  flags.DEFINE_string("out", None, "New bundle folder.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms model.jax_exported runs on.")
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)
