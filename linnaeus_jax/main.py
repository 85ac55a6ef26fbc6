"""Entry point: python -m linnaeus_jax.main --config=configs/demo.py --workdir=DIR [--config.x=v].

Rerunning the same command resumes from the latest checkpoint in DIR (`--resume=false` refuses
to touch a DIR that has checkpoints). SIGTERM saves a checkpoint and exits with
`--preempted_exit_code` (default 0). Several processes (hosts): the same command on each, with
--coordinator_address/--num_processes/--process_id, or none of them on a TPU pod slice or under
SLURM or Open MPI, where JAX finds them itself (`launch.py`, docs/distributed.md).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from linnaeus_jax import cli, launch
from linnaeus_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, logs, config).")
_RESUME = flags.DEFINE_bool("resume", True, "Resume from the latest checkpoint in --workdir; "
                            "false refuses to run in a workdir that has checkpoints.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..n-1.")
_PREEMPTED_EXIT_CODE = flags.DEFINE_integer(
    "preempted_exit_code", 0, "Exit code after SIGTERM saved a checkpoint (preemption); e.g. 143 "
    "lets a supervisor that restarts failed runs tell a preemption from completion.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  # After flag parsing: a bad flag is reported without importing jax.
  from linnaeus_jax import preemption, train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if not _RESUME.value:
    config = config_lib.with_changes(config, {"train.auto_resume": False})
  started = cli.call(launch.init_distributed, _COORDINATOR.value, _NUM_PROCESSES.value,
                     _PROCESS_ID.value)
  if started:
    print(started, flush=True)
  try:
    cli.call(train.run, config, _WORKDIR.value,
             errors=cli.INPUT_ERRORS + (FloatingPointError,))  # + a run of non-finite losses
  except preemption.Preempted:  # train.run has saved the checkpoint and said so
    sys.exit(_PREEMPTED_EXIT_CODE.value)


if __name__ == "__main__":
  cli.run(main)
