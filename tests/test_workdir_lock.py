import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from linnaeus_jax import workdir_lock

from conftest import ROOT

HOLD = ("import sys, time; from linnaeus_jax import workdir_lock; "
        "lock = workdir_lock.Lock(sys.argv[1]); print('locked', flush=True); time.sleep(60)")


def _holder(workdir):
  """A process of its own holding the lock on `workdir`."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      workdir_lock.Lock(str(tmp_path))
    assert f"pid {proc.pid} on host {socket.gethostname()}" in str(e.value), str(e.value)
  finally:
    proc.kill()
    proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.Lock(str(tmp_path))
  assert f"pid {proc.pid}" in caplog.text and "did not exit cleanly" in caplog.text
  with open(tmp_path / workdir_lock.NAME) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()
  assert os.path.getsize(tmp_path / workdir_lock.NAME) == 0  # released cleanly: no warning next
  caplog.clear()
  with caplog.at_level(logging.WARNING), workdir_lock.Lock(str(tmp_path)):
    pass
  assert "did not exit cleanly" not in caplog.text


def test_the_lock_is_free_again_after_release(tmp_path):
  with workdir_lock.acquire(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.Lock(str(tmp_path))
  workdir_lock.Lock(str(tmp_path)).release()
