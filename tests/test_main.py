"""The command line end to end, in subprocesses: several devices and processes, kill -9, SIGTERM.

Every run uses the same tiny config with every training-time random behaviour on (conftest's
`all_dynamics`), 20 steps, a checkpoint every 5; the reference is one uninterrupted run on one
device, made once for the module.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, once_per_run
from test_checkpoint import truncate_largest_array

pytestmark = pytest.mark.slow  # every test runs the CLI in subprocesses

STEPS = 20

CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from conftest import all_dynamics, tiny_config

def get_config():
  c = all_dynamics(tiny_config({data!r}, steps={steps}))
  c.schedule.checkpoint.interval_steps = 5
  c.schedule.checkpoint.keep_last_n = 4  # 5, 10, 15, 20: hops resume at 5 and 10
  return c
"""


@pytest.fixture(scope="module")
def config_file(small_dataset, tmp_path_factory):
  folder = once_per_run(tmp_path_factory, "main_config", lambda d: Path(d, "tiny.py").write_text(
      CONFIG.format(tests=os.path.join(ROOT, "tests"), data=small_dataset[0], steps=STEPS)))
  return os.path.join(folder, "tiny.py")


def _env(devices=1):
  """CPU with `devices` devices (and the test run's compilation cache, conftest's: a rerun
  compiles nothing, so it runs the same executables)."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _launch(config_file, workdir, *flags, devices=1):
  env = _env(devices)
  return subprocess.Popen(
      [sys.executable, "-m", "linnaeus_jax.main", f"--config={config_file}",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout=1200, code=0):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == code, out[-3000:]
  return out


def _train_records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:  # a line still being written (no newline yet) is read next time
    lines = [ln for ln in f if ln.endswith("\n")]
  return [r for r in map(json.loads, lines) if r["phase"] == "train"]


def _losses(workdir):
  recs = _train_records(workdir)
  steps = [r["step"] for r in recs]
  assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
  return {r["step"]: r["loss"] for r in recs}


def _wait_for_step(proc, workdir, step, timeout=900):
  t0 = time.time()
  while time.time() - t0 < timeout:
    recs = _train_records(workdir)
    if recs and recs[-1]["step"] >= step:
      return recs[-1]["step"]
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached in {timeout} s")


def _final_params(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir) as m:
    state = m.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return state["params"]


def _assert_same_params(a, b):
  import jax
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
  """One device, uninterrupted, made once per test run: (workdir, {step: loss})."""
  workdir = once_per_run(tmp_path_factory, "main_reference",
                         lambda d: _finish(_launch(config_file, d)))
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses


def test_kill_9_at_a_random_step_then_rerun_equals_the_uninterrupted_run(
    config_file, reference, tmp_path):
  ref_dir, ref = reference
  kill_at = random.Random().randint(2, STEPS - 2)
  proc = _launch(config_file, tmp_path)
  killed_at = _wait_for_step(proc, tmp_path, kill_at)
  proc.kill()  # SIGKILL: no handler runs, an asynchronous save may be half written
  proc.wait()
  out = _finish(_launch(config_file, tmp_path))
  msg = f"killed at step {killed_at}"
  resumed = int(out.split("resumed from step ")[1].split()[0]) if "resumed from" in out else 0
  assert resumed <= killed_at and resumed % 5 == 0, msg
  losses = _losses(tmp_path)
  assert sorted(losses) == list(range(1, STEPS + 1)), msg
  assert [losses[s] for s in losses] == [ref[s] for s in losses], msg  # bit-exact on CPU
  _assert_same_params(_final_params(tmp_path), _final_params(ref_dir))
  # Rerunning a finished run trains nothing and redoes only the final validation.
  n_lines = sum(1 for _ in open(tmp_path / "metrics.jsonl"))
  out = _finish(_launch(config_file, tmp_path))
  assert f"Training already finished at step {STEPS}" in out
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len(lines) == n_lines and _losses(tmp_path) == losses
  assert [l["phase"] for l in lines[-2:]] == ["val", "val_mask_meta"]


KILL_IN_SAVE = """
import os, signal, sys
from linnaeus_jax import checkpoint
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args, **kw):
  save(self, step, *args, **kw)  # returns once the device->host copy is done; writing goes on
  if step == 10:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
from absl import app
from linnaeus_jax import main
app.run(main.main)
"""


def test_a_run_killed_during_an_asynchronous_save_resumes_from_the_previous_one(
    config_file, reference, tmp_path):
  script = tmp_path / "kill_in_save.py"
  script.write_text(KILL_IN_SAVE)
  proc = subprocess.run([sys.executable, str(script), f"--config={config_file}",
                         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                        text=True, env=_env(), timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
  ckpt_dir = tmp_path / "run" / "checkpoints"
  entries = os.listdir(ckpt_dir)
  assert "5" in entries and "10" not in entries, entries  # step 10 was not finalized
  assert any(e.startswith("10.") for e in entries), entries  # its temporary folder is there
  out = _finish(_launch(config_file, tmp_path / "run"))
  assert "resumed from step 5 " in out
  assert "10" in os.listdir(ckpt_dir)
  assert not any(e.startswith("10.") for e in os.listdir(ckpt_dir))  # cleaned up
  assert _losses(tmp_path / "run") == reference[1]


def test_sigterm_saves_the_current_step_and_exits_0(config_file, reference, tmp_path):
  proc = _launch(config_file, tmp_path)
  _wait_for_step(proc, tmp_path, 7)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  last = _train_records(tmp_path)[-1]["step"]
  assert f"SIGTERM: saved the checkpoint at step {last}" in out
  assert last < STEPS
  with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as m:
    assert m.latest_step() == last
  out = _finish(_launch(config_file, tmp_path))
  assert f"resumed from step {last} " in out
  assert _losses(tmp_path) == reference[1]


def test_resume_false_refuses_a_workdir_with_checkpoints(config_file, reference):
  proc = _launch(config_file, reference[0], "--resume=false")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert "already holds checkpoints (latest step 20)" in out and "new --workdir" in out


def test_a_second_run_on_the_same_workdir_exits_1_naming_the_first(config_file, reference,
                                                                    tmp_path):
  """The second run starts once the first holds the lock (and at least 5 s later), exits 1 while
  the first is still running, naming it; the first finishes as if alone. Then a damaged latest
  checkpoint stops a rerun with one error line naming the step to resume from."""
  first = _launch(config_file, tmp_path)
  t0, lock = time.time(), tmp_path / "run.lock"
  while time.time() - t0 < 5 or not (lock.exists() and lock.stat().st_size):
    assert first.poll() is None, first.communicate()[0][-3000:]
    time.sleep(0.1)
  t1 = time.time()
  second = _launch(config_file, tmp_path)
  out, _ = second.communicate(timeout=600)
  print(f"the second run exited after {time.time() - t1:.1f} s")
  assert second.returncode == 1 and first.poll() is None, out[-3000:]
  assert f"error: {tmp_path} is in use by another run (pid {first.pid} on host" in out, out
  _finish(first)
  assert _losses(tmp_path) == reference[1]
  truncate_largest_array(tmp_path / "checkpoints" / str(STEPS))
  out = _finish(_launch(config_file, tmp_path), code=1)
  assert f"error: the checkpoint at step {STEPS} in" in out and "Traceback" not in out, out
  assert "data is unreadable" in out and "--config.train.resume_step=15" in out, out


def test_a_batch_too_big_for_the_device_fails_before_anything_is_created(config_file, tmp_path):
  proc = _launch(config_file, tmp_path / "run", "--config.data.img_size=2048",
                 "--config.data.batch_size=4096")
  out = _finish(proc, code=1)
  assert "error: the train step needs " in out and "GiB per device" in out, out[-3000:]
  assert "lower data.batch_size" in out and not (tmp_path / "run").exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(config_file, workdir, *flags):
  """One run as 2 local processes of 2 CPU devices each (gloo collectives between them)."""
  port = _free_port()
  return [_launch(config_file, workdir, f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}", *flags, devices=2)
          for i in range(2)]


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()  # SIGKILL: JAX takes SIGTERM for a preemption notice and waits for its peers


def _finish_all(procs, timeout=900, grace=60):
  """The outputs of the processes of one multi-process run, all of which must exit 0. A
  deadlock (processes waiting for each other in a collective never finish) or a process that
  failed (its peers then wait for it forever) fails the test with every process's output, after
  killing them all, instead of stalling the suite: after `timeout` s, or `grace` s after the
  first failure."""
  outs = [""] * len(procs)

  def read(i):
    outs[i] = procs[i].communicate()[0]
  readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
  for t in readers:
    t.start()
  deadline, problem = time.time() + timeout, None
  while any(t.is_alive() for t in readers):
    failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
    if failed and problem is None:
      problem = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
      deadline = min(deadline, time.time() + grace)
    if time.time() > deadline:
      problem = problem or f"not finished after {timeout} s: deadlocked?"
      _kill(procs)
      for t in readers:
        t.join(60)
      break
    time.sleep(0.2)
  if problem is None and any(p.returncode != 0 for p in procs):
    problem = "exit codes " + ", ".join(str(p.returncode) for p in procs)
  if problem is not None:
    pytest.fail(f"{len(procs)}-process run: {problem}\n" + "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{outs[i][-3000:]}"
        for i, p in enumerate(procs)), pytrace=False)
  return outs


def _copy_at(workdir, dest, step):
  """A copy of `workdir` whose latest checkpoint is `step` (the later ones deleted): a run on it
  resumes there, as if stopped right after that checkpoint."""
  shutil.copytree(workdir, dest)
  for s in os.listdir(dest / "checkpoints"):
    if int(s.split(".")[0]) > step:
      shutil.rmtree(dest / "checkpoints" / s)
  lines = (dest / "metrics.jsonl").read_text().splitlines(keepends=True)
  (dest / "metrics.jsonl").write_text("".join(l for l in lines if json.loads(l)["step"] <= step))
  return dest


def _state_mib(out):
  """(total, per device, this process) from the 'train state ... in this process' line."""
  line = out.split("train state ")[1].split(" in this process")[0]
  return [float(v.split()[0].replace(",", "")) for v in line.split(", ")]


def _assert_losses_match(workdir, ref, first):
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  steps = range(first, STEPS + 1)
  np.testing.assert_allclose([losses[s] for s in steps], [ref[s] for s in steps],
                             rtol=2e-5, atol=2e-5)


FSDP4 = ("--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=64")


def test_two_processes_resume_from_one_device_change_mesh_and_go_back(config_file, reference,
                                                                      tmp_path):
  """Gloo collectives between 2 local processes of 2 devices, the global batch of 16 the same.
  1 device -> fsdp=4 across both processes (from step 5); SIGTERM to one process (a preemption
  notice to one host) stops both at the same step with a checkpoint; rerun as data=2 x fsdp=2;
  then the checkpoint of step 10, written by both processes, goes back to 1 device. Every hop
  equals the uninterrupted 1-device run."""
  ref_dir, ref = reference
  run = _copy_at(Path(ref_dir), tmp_path / "run", 5)
  procs = _launch_two(config_file, run, *FSDP4)
  try:
    _wait_for_step(procs[0], run, 8)
  except BaseException:
    _kill(procs)
    raise
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish_all(procs)
  assert "written by 1 process(es), this run has 2" in outs[0], outs[0][-3000:]
  total, per_device, per_process = _state_mib(outs[0])
  assert "mesh data=1 x fsdp=4" in outs[0] and per_device < 0.35 * total, outs[0][-3000:]
  assert per_process == pytest.approx(2 * per_device, rel=0.01)
  last = _train_records(run)[-1]["step"]
  assert last < STEPS and f"SIGTERM: saved the checkpoint at step {last}" in outs[0]
  with ocp.CheckpointManager(str(run / "checkpoints")) as m:
    assert m.latest_step() == last

  outs = _finish_all(_launch_two(config_file, run, "--config.mesh.fsdp=2", FSDP4[1]))
  assert "on 4 device(s)" in outs[0] and f"resumed from step {last} " in outs[0]
  assert "mesh data=2 x fsdp=2" in outs[0] and "process(es)" not in outs[0]
  _assert_losses_match(run, ref, 6)
  # Both processes wrote their iterator state and their shards; only process 0 logged.
  step_dir = run / "checkpoints" / str(STEPS)
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir / "state"))
  assert "top-1 (%) per rank" in outs[0] and "top-1 (%) per rank" not in outs[1]
  assert "tensorboard --logdir" in outs[0] and "tensorboard --logdir" not in outs[1]

  back = _copy_at(run, tmp_path / "back", 10)
  out = _finish(_launch(config_file, back))
  assert "written by 2 process(es), this run has 1" in out and "resumed from step 10 " in out
  _assert_losses_match(back, ref, 11)


def test_fsdp_across_two_processes_from_scratch_then_data_mesh_on_one(config_file, reference,
                                                                       tmp_path):
  """fsdp=4 from scratch (no checkpoint) across 2 processes of 2 devices: the first step once
  deadlocked there (a conditional holding the kernel's all-gathers, layers.py), so the run is
  guarded (`_finish_all`). Then its step 5 resumed as data=4 in one process of 4 devices (the
  other direction, data -> fsdp, is the two-process test's first hop). Orbax reshards on
  restore; the losses equal 1 device's."""
  ref = reference[1]
  fsdp = tmp_path / "fsdp"
  outs = _finish_all(_launch_two(config_file, fsdp, *FSDP4))
  total, per_device, per_process = _state_mib(outs[0])
  assert "mesh data=1 x fsdp=4" in outs[0] and per_device < 0.35 * total, outs[0][-3000:]
  assert per_process == pytest.approx(2 * per_device, rel=0.01)
  assert "resumed" not in outs[0] and "on 4 device(s)" in outs[0]
  _assert_losses_match(fsdp, ref, 1)
  data = _copy_at(fsdp, tmp_path / "data", 5)
  out = _finish(_launch(config_file, data, devices=4))
  assert "mesh data=4 x fsdp=1" in out and "resumed from step 5 " in out
  assert "written by 2 process(es), this run has 1" in out
  _assert_losses_match(data, ref, 6)


@pytest.mark.parametrize("args,needle", [
    (["--config=configs/demo.py", "--config.data.batchsize=8"],
     "unknown key data.batchsize (did you mean data.batch_size?)"),
    (["--config=configs/demo.py", "--config.data.batch_size=abc"],
         "data.batch_size must be an integer >= 1 or 'auto', got 'abc'"),
    (["--config=configs/missing.py"], "--config=configs/missing.py: no such file"),
    (["--config={syntax}"], "SyntaxError"),
    (["--config={raises}"], "get_config() raised RuntimeError: no data here; second line"),
])
def test_bad_config_flags_fail_in_one_line_before_the_workdir_exists(tmp_path, args, needle):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "raises.py").write_text(
      "def get_config():\n  raise RuntimeError('no data here\\nsecond line')\n")
  args = [a.format(syntax=tmp_path / "syntax.py", raises=tmp_path / "raises.py") for a in args]
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.main", f"--workdir={workdir}", *args],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr[-3000:]
  assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
  assert not workdir.exists()


def test_a_preempted_run_exits_with_preempted_exit_code(monkeypatch, tmp_path):
  from absl import flags
  from absl.testing import flagsaver
  from linnaeus_jax import main, preemption, train

  def preempted(config, workdir):
    raise preemption.Preempted(7)  # after train.run has saved the SIGTERM checkpoint

  monkeypatch.setattr(train, "run", preempted)
  for extra, code in (([], 0), (["--preempted_exit_code=143"], 143)):
    with flagsaver.flagsaver():
      flags.FLAGS(["main", f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
                   f"--workdir={tmp_path}", *extra])
      with pytest.raises(SystemExit) as e:
        main.main(["main"])
    assert e.value.code == code
