"""Entry point: python -m linnaeus_jax.main --config=configs/demo.py --workdir=DIR [--config.x=v].

Rerunning the same command resumes from the latest checkpoint in DIR.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from linnaeus_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, logs, config).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax and Grain log every checkpoint phase at INFO through absl; keep the console readable.
  logging.set_verbosity(logging.WARNING)
  from linnaeus_jax import train  # pylint: disable=g-import-not-at-top  (after flag parsing)
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
