"""Multi-process start-up: which launcher started this process, and `jax.distributed` from it.

A run is multi-process when --coordinator_address/--num_processes/--process_id are given (all
three), or when a launcher that JAX configures itself started several processes: SLURM's `srun`
(SLURM_NTASKS > 1), Open MPI's `mpirun` (OMPI_COMM_WORLD_SIZE > 1) or a TPU pod slice (several
TPU_WORKER_HOSTNAMES). Under SLURM and Open MPI, JAX gives each process ONE local device (the
one of its local rank): start one process per GPU there (scripts/slurm.sbatch).
"""

from __future__ import annotations

import os
from typing import Mapping

from absl import logging

from linnaeus_jax import config as config_lib

# (launcher, the variable that holds its process count, and the one of this process's index).
LAUNCHERS = (("slurm", "SLURM_NTASKS", "SLURM_PROCID"),
             ("openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))


def detect(env: Mapping[str, str]) -> dict | None:
  """{launcher, num_processes, process_id} of a multi-process launch named by `env`, or None
  (a single process, e.g. `python` run directly in an sbatch script of one task)."""
  for name, count, index in LAUNCHERS:
    if int(env.get(count, "1") or 1) > 1:
      return {"launcher": name, "num_processes": int(env[count]),
              "process_id": int(env.get(index, "-1"))}
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return {"launcher": "tpu pod", "num_processes": len(hosts),
            "process_id": int(env.get("TPU_WORKER_ID", "-1"))}
  return None


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None, env: Mapping[str, str] | None = None) -> str | None:
  """jax.distributed.initialize from the flags, or from the launcher's environment (`detect`);
  returns a line saying which, or None for a single process. On CPU the collectives between
  processes run over gloo."""
  import jax  # pylint: disable=g-import-not-at-top
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise config_lib.ConfigError("--coordinator_address, --num_processes and --process_id go "
                                 "together: give all three or none")
  found = None if all(given) else detect(os.environ if env is None else env)
  if not all(given) and found is None:
    return None
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    how = f"flags, coordinator {coordinator}"
  else:
    jax.distributed.initialize()
    how = found["launcher"]
  if jax.default_backend() == "cpu" and jax.config.jax_compilation_cache_dir:
    # Executables loaded from the persistent cache fail to set up their gloo contexts (JAX
    # 0.10.2: "Gloo context initialization failed" on the first collective after a rerun).
    logging.warning("persistent compilation cache disabled: it breaks multi-process CPU runs")
    jax.config.update("jax_enable_compilation_cache", False)
  return (f"distributed: process {jax.process_index()} of {jax.process_count()} ({how}), "
          f"{jax.local_device_count()} local of {jax.device_count()} device(s)")
