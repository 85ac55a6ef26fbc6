import json
import os
import subprocess
import sys

import numpy as np
import pytest

from linnaeus_jax.tools import model_summary, schedule  # noqa: F401  (side by side)

from conftest import ROOT


@pytest.mark.slow
def test_cli_writes_json_png_and_prints_groups(tmp_path):
  out = str(tmp_path / "sched")
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.tools.schedule",
                      "--config=configs/demo.py", "--config.train.steps=50", f"--out={out}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  with open(os.path.join(out, "schedules.json")) as f:
    data = json.load(f)
  assert set(data) == {"steps", "lr", "schedule"}
  assert data["steps"] == list(range(50))
  assert list(data["lr"]) == ["default"] and len(data["lr"]["default"]) == 50
  assert set(data["schedule"]) == {"schedule/meta_mask_prob", "schedule/partial_mask_prob",
                                   "schedule/null_incl_prob", "schedule/mix_prob"}
  assert all(len(v) == 50 for v in data["schedule"].values())
  lr = data["lr"]["default"]  # demo: 1e-5 -> 2e-3 over 25 steps, cosine to 1e-5 over 25
  np.testing.assert_allclose(lr[0], 1e-5, rtol=1e-5)
  np.testing.assert_allclose(lr[25], 2e-3, rtol=1e-5)
  np.testing.assert_allclose(lr[37], 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + np.cos(np.pi * 12 / 25)),
                             rtol=1e-5)
  mm = data["schedule"]["schedule/meta_mask_prob"]  # 0.5 -> 0.1 by 50% of 50 steps
  np.testing.assert_allclose([mm[0], mm[10], mm[49]], [0.5, 0.5 - 0.4 * 10 / 25, 0.1], rtol=1e-5)
  assert os.path.getsize(os.path.join(out, "schedules.png")) > 1000
  assert "default" in r.stdout and "adamw" in r.stdout and "tensors" in r.stdout


def test_epochs_need_steps_per_epoch_and_points_subsample(tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config("unused")
  c.train.steps, c.train.epochs = 0, 3.0
  try:
    schedule.compute(c)
    raise AssertionError("expected a ConfigError")
  except Exception as e:  # pylint: disable=broad-except
    assert "--steps_per_epoch" in str(e)
  res = schedule.write(c, str(tmp_path), steps_per_epoch=1000, points=100)
  assert res["info"]["total_steps"] == 3000 and len(res["steps"]) == 100
  assert res["steps"][0] == 0 and res["steps"][-1] == 2999
  assert schedule.steps_to_show(10, 100) == list(range(10))
  pg = c.optimizer.parameter_groups  # the LR of every group, in matching order
  pg.enabled, pg.order = True, ["z_heads", "a_rest"]
  pg.groups.z_heads = dict(filter="startswith:head/", lr_multiplier=3.0)
  pg.groups.a_rest = dict(filter="all", lr_multiplier=0.5)
  res = schedule.compute(c, steps_per_epoch=10, points=0)
  assert list(res["lr"]) == ["z_heads", "a_rest", "default"]
  np.testing.assert_allclose(res["lr"]["z_heads"], 6 * np.asarray(res["lr"]["a_rest"]),
                             rtol=1e-6)
  rows = {r["group"]: r for r in res["groups"]}
  assert rows["default"]["tensors"] == 0 and rows["z_heads"]["tensors"] == 8
