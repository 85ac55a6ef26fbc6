"""Launcher detection from each launcher's environment variables (faked), and the scripts."""

import os
import subprocess

import pytest
import yaml
from jax._src import clusters  # JAX's own cluster detection, which jax.distributed uses

from conftest import ROOT
from linnaeus_jax import config as config_lib, launch

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


@pytest.mark.parametrize("env,want", [
    (SLURM, {"launcher": "slurm", "num_processes": 16, "process_id": 9}),
    (OMPI, {"launcher": "openmpi", "num_processes": 4, "process_id": 3}),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3", "TPU_WORKER_ID": "2"},
     {"launcher": "tpu pod", "num_processes": 4, "process_id": 2}),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),  # python run directly in a one-task job
    ({"TPU_WORKER_HOSTNAMES": "t-w-0", "TPU_WORKER_ID": "0"}, None),  # a single TPU VM
    ({}, None),
])
def test_each_launcher_is_detected_from_its_variables(env, want):
  assert launch.detect(env) == want


@pytest.mark.parametrize("env,want", [
    (SLURM, ("gpu003:61586", 16, 9, [1])),  # port 61440 + 4242 % 4096
    (OMPI, ("10.96.0.1:62624", 4, 3, [1])),  # 61440 + (1531576320 // 4096) % 4096
])
def test_jax_reads_the_same_variables_with_one_device_per_process(monkeypatch, env, want):
  """What jax.distributed.initialize() takes from the launcher: coordinator, process count and
  index, and ONE local device (the local rank's): why scripts/slurm.sbatch starts one process
  per GPU."""
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  got = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None,
                                                                 None)
  assert (got[0], got[1], got[2], list(got[3])) == want


def test_flags_go_together_and_one_process_initialises_nothing():
  with pytest.raises(config_lib.ConfigError, match="give all three or none"):
    launch.init_distributed("127.0.0.1:1234", 2, None, env={})
  assert launch.init_distributed(None, None, None, env={"SLURM_NTASKS": "1"}) is None


def test_launch_scripts_parse():
  for script in ("slurm.sbatch", "tpu_pod.sh"):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", script)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
  docs = list(yaml.safe_load_all(open(os.path.join(ROOT, "scripts", "k8s_jobset.yaml"))))
  (jobset,) = [d for d in docs if d["kind"] == "JobSet"]
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  rules = job["podFailurePolicy"]["rules"]
  assert any(r["action"] == "Ignore" and 143 in r["onExitCodes"]["values"] for r in rules)
  command = " ".join(job["template"]["spec"]["containers"][0]["command"])
  assert "--preempted_exit_code=143" in command and "--process_id=" in command
