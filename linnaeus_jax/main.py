"""Entry point: python -m linnaeus_jax.main --config=configs/demo.py --workdir=DIR [--config.x=v].

Rerunning the same command resumes from the latest checkpoint in DIR (`--resume=false` refuses
to touch a DIR that has checkpoints). SIGTERM saves a checkpoint and exits with
`--preempted_exit_code` (default 0). Several processes (hosts): the same command on each, with
--coordinator_address/--num_processes/--process_id, or none of them on a TPU pod slice or under
SLURM, where JAX finds them itself (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from linnaeus_jax import cli
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


def _cluster_detected() -> bool:
  """A multi-process launch that jax.distributed.initialize() configures by itself."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
  """jax.distributed.initialize from the flags, or from the environment when it names a cluster.

  On CPU the collectives between processes run over gloo.
  """
  import jax  # pylint: disable=g-import-not-at-top
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise config_lib.ConfigError("--coordinator_address, --num_processes and --process_id go "
                                 "together: give all three or none")
  if not all(given) and not _cluster_detected():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  if jax.default_backend() == "cpu" and jax.config.jax_compilation_cache_dir:
    # Executables loaded from the persistent cache fail to set up their gloo contexts (JAX
    # 0.10.2: "Gloo context initialization failed" on the first collective after a rerun).
    logging.warning("persistent compilation cache disabled: it breaks multi-process CPU runs")
    jax.config.update("jax_enable_compilation_cache", False)


def main(argv):
  cli.start(argv)
  # After flag parsing: a bad flag is reported without importing jax.
  from linnaeus_jax import preemption, train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if not _RESUME.value:
    config.train.auto_resume = False
  cli.call(init_distributed, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    cli.call(train.run, config, _WORKDIR.value,
             errors=cli.INPUT_ERRORS + (FloatingPointError,))  # + a run of non-finite losses
  except preemption.Preempted:  # train.run has saved the checkpoint and said so
    sys.exit(_PREEMPTED_EXIT_CODE.value)


if __name__ == "__main__":
  cli.run(main)
