"""Summarises what a config's data resolves to, without training.

    python -m linnaeus_jax.tools.inspect_dataset --config=configs/demo.py [--workdir=DIR]

Prints one JSON object (rows, drops per filter, classes and nulls per task, metadata validity per
component, and per component the rows whose encoded metadata held NaN or inf and were therefore
made invalid) and, with --workdir, writes the class maps, taxonomy and per-class counts into
DIR/assets as training does.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags
from ml_collections import config_flags



def summary(data, partial: bool) -> dict:
  used = np.concatenate([data.train.labels, data.val.labels])
  valid = np.concatenate([data.train.meta_valid, data.val.meta_valid])
  return {
      "rows_total": int(data.rows_total),
      "rows_used": int(len(used)),
      "rows_train": int(len(data.train)),
      "rows_val": int(len(data.val)),
      "dropped": dict(data.dropped),
      "tasks": {t: {"num_classes": int(data.num_classes[t]),
                    "null_count": int(np.sum(used[:, j] == 0)) if partial else 0}
                for j, t in enumerate(data.task_keys)},
      "meta_valid_fraction": {name: float(valid[:, c].mean()) if len(valid) else 0.0
                              for c, (name, _) in enumerate(data.components)},
      "meta_nonfinite_rows": {name: int(data.nonfinite_meta.get(name, 0))
                              for name, _ in data.components},
  }


def main(argv):
  from linnaeus_jax import assets, cli  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import resolve as resolve_lib  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  config, data = cli.call(resolve_lib.resolve, _CONFIG.value)
  if _WORKDIR.value:
    assets.write(_WORKDIR.value, config, data)
  print(json.dumps(summary(data, config.data.partial.levels), indent=1))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the tools can be imported side by side.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                            lock_config=False)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the JSON assets (optional).")
  flags.mark_flags_as_required(["config"])
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
