import json
import os
import subprocess
import sys

import numpy as np
import pytest

from linnaeus_jax import train

from conftest import ROOT, tiny_config


def _train_records(workdir):
  """step -> train record; later lines (a resumed run) override earlier ones."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["phase"] == "train":
        out[rec["step"]] = rec
  return out


def _losses(workdir):
  return {s: r["loss"] for s, r in _train_records(workdir).items()}


def test_end_to_end_learns(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0], steps=80)
  c.schedule.validation.interval_steps = 40
  val = train.run(c, str(tmp_path))
  losses = _losses(tmp_path)
  assert sorted(losses) == list(range(1, 81))
  assert np.mean([losses[s] for s in range(71, 81)]) < 0.7 * np.mean([losses[s] for s in range(1, 6)])
  # Chance is 1/2 for the 2 orders and 1/4 for the 4 families (null classes never occur there).
  assert val["acc1/taxa_L40"] > 80.0
  assert val["acc1/taxa_L30"] > 50.0
  assert val["num_examples"] > 0
  for name in ("config.json", "metrics.jsonl", "assets/class_to_idx.json"):
    assert os.path.exists(tmp_path / name), name
  resolved = json.load(open(tmp_path / "config.json"))
  assert resolved["model"]["classification"]["heads"]["taxa_L10"]["num_classes"] == 17
  assert os.listdir(tmp_path / "tensorboard")
  phases = {json.loads(l)["phase"] for l in open(tmp_path / "metrics.jsonl")}
  assert phases == {"train", "val", "val_mask_meta"}  # the final validation masks metadata too
  for name in ("meta_ablation.png", "confusion_taxa_L40.png"):
    assert os.path.getsize(tmp_path / "plots" / name) > 0
  # The measured masked fraction follows the logged schedule (16 samples a step, 80 steps).
  recs = _train_records(tmp_path)
  p = np.array([recs[s]["schedule/meta_mask_prob"] for s in range(1, 81)])
  assert p[0] == 0.5 and p[-1] == 0.0  # 0.5 -> 0 by half of the 80 steps
  for comp in ("TEMPORAL", "SPATIAL", "ELEVATION"):
    frac = np.array([recs[s][f"meta_masking/masked_frac/{comp}"] for s in range(1, 81)])
    assert abs(frac.mean() - p.mean()) < 4 * np.sqrt(np.sum(p * (1 - p)) * 16) / (80 * 16)
    assert frac[40:].max() == 0.0  # nothing masked once the schedule reaches 0


def test_head_size_mismatch_with_data_is_an_error(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0])
  c.model.classification.heads.taxa_L10.num_classes = 5
  with pytest.raises(ValueError, match="taxa_L10.num_classes is 5 but the data has 17"):
    train.resolve(c)


def _main(*args):
  return subprocess.run([sys.executable, "-m", "linnaeus_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_reports_bad_config_clearly(tmp_path):
  r = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.data.img_size=50",
            "--config.model.rope_mode=spin")
  assert r.returncode == 1
  assert "multiple of 32" in r.stderr and "rope_mode 'spin'" in r.stderr
  r = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.train.stepz=5")
  assert r.returncode != 0 and "stepz" in r.stderr


def _step_setup(small_dataset, **train_kw):
  """A tiny config's state, a jitted train step and a real 16-sample batch."""
  import jax
  from linnaeus_jax import optim, schedules
  from linnaeus_jax.data import pipeline
  c = tiny_config(small_dataset[0], **train_kw)
  c.model.drop_path_rate = 0.0
  c.schedule.meta_masking.enabled = False
  c, data = train.resolve(c)
  tx, lrs = optim.build(c, 100, 10)
  graphdef, init = train.create_state(c, data.taxonomy.parents)
  state = jax.jit(lambda: init(tx))()
  step = jax.jit(train.make_train_step(graphdef, tx, c, lrs,
                                       schedules.Schedules.from_config(c, 100, 10)))
  batch = next(iter(pipeline.train_dataset(data, c, 100, 0, 1)))
  return c, state, step, batch, train.loss_constants(c, data)


def test_accumulated_micro_batches_equal_one_large_batch(small_dataset):
  import jax
  _, state, step1, batch, consts = _step_setup(small_dataset)
  _, _, step2, _, _ = _step_setup(small_dataset, accumulation_steps=2)
  # Without padding or excluded samples every micro-batch has the same weight: mean of the
  # micro-batch means = the mean over the batch.
  assert np.asarray(batch["example_mask"]).all()
  a_state, a = step1(jax.tree.map(np.asarray, state), batch, consts)
  b_state, b = step2(jax.tree.map(np.asarray, state), batch, consts)
  np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(b["grad_norm"]), float(a["grad_norm"]), rtol=1e-4)
  assert float(b["acc"]["counts"]["n"]) == float(a["acc"]["counts"]["n"]) == 16
  for x, y in zip(jax.tree.leaves(b_state["params"]), jax.tree.leaves(a_state["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_a_nan_batch_skips_the_update_and_is_counted(small_dataset):
  import jax
  _, state, step, batch, consts = _step_setup(small_dataset)
  bad = dict(batch, meta={k: np.full_like(np.asarray(v), np.nan) for k, v in batch["meta"].items()})
  before = jax.tree.map(np.asarray, state)
  after, out = step(jax.tree.map(np.asarray, state), bad, consts)
  assert not np.isfinite(float(out["loss"]))
  for x, y in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])):
    np.testing.assert_array_equal(x, y)
  assert int(after["nonfinite_streak"]) == 1 and int(out["nonfinite_skips"]) == 1
  assert int(after["step"]) == 1  # the step still advances (the LR schedule with it)
  after, out = step(after, batch, consts)
  assert np.isfinite(float(out["loss"])) and int(after["nonfinite_streak"]) == 0
  assert int(after["nonfinite_skips"]) == 1


def test_training_stops_after_repeated_non_finite_steps(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0], steps=30, nonfinite_patience=3)
  c.lr_scheduler.base_lr = c.lr_scheduler.warmup_lr = 1e30  # the first update overflows
  c.lr_scheduler.warmup_steps = 0
  with pytest.raises(FloatingPointError, match="non-finite for 3 steps in a row"):
    train.run(c, str(tmp_path))
  recs = _train_records(tmp_path)
  assert max(recs) < 10 and recs[max(recs)]["nonfinite_skips"] == 3


def test_early_stopping_keeps_the_best_checkpoint_and_stays_stopped(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0], steps=30)
  c.schedule.validation.interval_steps = 5
  c.schedule.checkpoint.keep_last_n, c.schedule.checkpoint.keep_top_n = 1, 1
  c.train.early_stop.update(dict(active=True, metric="val/loss", patience=2, min_delta=1e9))
  train.run(c, str(tmp_path))  # step 5 is the best; steps 10 and 15 do not improve by 1e9
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [5, 15]
  recs = _train_records(tmp_path)
  assert max(recs) == 15
  train.run(c, str(tmp_path))  # a rerun does not train past the stop: it redoes the final
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]  # validation, once
  assert max(l["step"] for l in lines) == 15
  assert [l["phase"] for l in lines if l["step"] == 15 and l["phase"] != "train"] == [
      "val", "val_mask_meta"]
