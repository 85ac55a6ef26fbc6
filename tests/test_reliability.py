"""Unlucky and hostile training runs: a diverging run, a damaged or mismatched checkpoint.

Data-side hostile inputs are in test_reliability_data.py, inference-side ones in
test_reliability_inference.py, the command line's one-line errors in test_main.py.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from linnaeus_jax import checkpoint, evaluate, train

from conftest import ROOT, tiny_config
from test_checkpoint import truncate_largest_array

pytestmark = pytest.mark.slow  # every test trains


def _config(dataset_dir, steps, **overrides):
  c = tiny_config(dataset_dir, steps=steps)
  c.schedule.checkpoint.interval_steps = 2
  c.schedule.checkpoint.keep_last_n = 3
  c.update_from_flattened_dict(overrides)
  return c


def _steps(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    return sorted(m.all_steps())


def _params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    return m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]


def test_a_diverging_run_never_replaces_its_last_good_checkpoint(small_dataset, tmp_path, capsys):
  """Resumed at step 4 with base_lr=1e9 and a checkpoint due every 2 steps: the run stops after
  `nonfinite_patience` skipped steps, naming step 4, which is still there, evaluates to a
  finite loss, and is where a rerun resumes. From scratch there is no good checkpoint to name."""
  data, wd = small_dataset[0], str(tmp_path / "run")
  train.run(_config(data, 4), wd)
  assert _steps(wd) == [2, 4]
  diverge = _config(data, 20, **{"lr_scheduler.base_lr": 1e9})
  for attempt in range(2):
    capsys.readouterr()
    with pytest.raises(FloatingPointError, match=r"The last good checkpoint \(step 4\) is kept"):
      train.run(diverge, wd)
    out = capsys.readouterr().out
    assert "resumed from step 4 " in out and "no checkpoint: the train state" in out, out
    assert _steps(wd) == [2, 4], attempt
  step, results, _ = evaluate.evaluate_checkpoint(diverge, wd)
  assert step == 4 and np.isfinite(results["val"]["loss"]), results["val"]["loss"]
  fresh = str(tmp_path / "fresh")
  capsys.readouterr()
  with pytest.raises(FloatingPointError, match="No checkpoint was saved before this"):
    train.run(diverge, fresh)
  # Step 2's update diverged (its loss was finite): its checkpoint went when step 3 was not.
  assert "checkpoint(s) [2] deleted: step 3 after them was non-finite" in capsys.readouterr().out
  assert _steps(fresh) == []


@pytest.fixture(scope="module")
def finished(small_dataset, tmp_path_factory):
  """A 6-step run with checkpoints at 2, 4 and 6."""
  wd = str(tmp_path_factory.mktemp("finished"))
  train.run(_config(small_dataset[0], 6), wd)
  assert _steps(wd) == [2, 4, 6]
  return wd


def test_a_damaged_latest_checkpoint_stops_and_resume_step_skips_it(finished, small_dataset,
                                                                    tmp_path, capsys):
  """No silent restart: an error naming the step, the damage and the step to resume from; with
  train.resume_step the damaged step is set aside and the run ends where it would have. (Every
  kind of damage: test_checkpoint.py's table.)"""
  wd = str(tmp_path / "run")
  shutil.copytree(finished, wd)
  truncate_largest_array(tmp_path / "run" / "checkpoints" / "6")
  config = _config(small_dataset[0], 6)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step 6 .* is damaged: its data is unreadable.*resume_step=4"):
    train.run(config, wd)
  config.train.resume_step = 4
  train.run(config, wd)
  assert os.listdir(os.path.join(wd, "checkpoints_set_aside")) == ["6"] and _steps(wd) == [2, 4, 6]
  capsys.readouterr()
  train.run(config, wd)  # the same command again: the new step 6 is intact, nothing set aside
  out = capsys.readouterr().out
  assert "train.resume_step=4 ignored" in out and "Training already finished at step 6" in out
  assert os.listdir(os.path.join(wd, "checkpoints_set_aside")) == ["6"] and _steps(wd) == [2, 4, 6]
  for a, b in zip(jax.tree.leaves(_params(wd, 6)), jax.tree.leaves(_params(finished, 6))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config

def get_config():
  c = tiny_config({data!r}, steps=6)
  c.schedule.checkpoint.interval_steps = 2
  c.schedule.checkpoint.keep_last_n = 3
  return c
"""


def test_resuming_with_another_model_names_the_differing_parameters(finished, small_dataset,
                                                                  tmp_path):
  """One `error:` line (no asyncio noise after it), exit 1, the checkpoints untouched."""
  path = tmp_path / "config.py"
  path.write_text(CONFIG.format(tests=os.path.join(ROOT, "tests"), data=small_dataset[0]))
  wd = str(tmp_path / "run")
  shutil.copytree(finished, wd)
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.main", f"--config={path}",
                      f"--workdir={wd}", "--config.model.convnext_stages.dims=(16,24,32,64)",
                      "--config.model.rope_stages.dims=(32,64)"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("W", "I"))]
  assert len(errors) == 1 and errors[0].startswith("error: the checkpoint at step 6"), r.stderr
  assert "saved for another model" in errors[0] and ": checkpoint (" in errors[0], errors[0]
  assert _steps(wd) == [2, 4, 6]
