import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from linnaeus_jax import config as config_lib
from linnaeus_jax import resolve as resolve_lib
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


@pytest.mark.slow
def test_end_to_end_learns(small_dataset, tmp_path, capsys):
  c = tiny_config(small_dataset[0], steps=80)
  c.schedule.validation.interval_steps = 40
  val = train.run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert out.count(" top-1 (%) per rank:") == 2  # steps 40 and 80
  assert "  phase" + " " * 29 + "loss   taxa_L40   taxa_L30   taxa_L20   taxa_L10" in out
  assert (f"done: step 80 in {tmp_path}: checkpoints/ (step 80), metrics.jsonl, config.json, "
          "assets/, eval/step_80.json (+ _per_class.csv), plots/\n") in out
  assert out.rstrip().endswith(
      f"TensorBoard: tensorboard --logdir {tmp_path / 'tensorboard'}\n"
      f"  export: python -m linnaeus_jax.export --workdir={tmp_path} --out=BUNDLE_DIR"), out
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
  # The 'auto' settings are recorded as what they became on this CPU, with the reasons.
  assert (resolved["model"]["dtype"], resolved["model"]["attention_impl"]) == ("float32", "xla")
  assert isinstance(resolved["data"]["num_workers"], int)
  notes = resolved["misc"]["auto_choices"]
  assert notes[0].startswith("model.dtype=auto -> float32 on cpu"), notes
  assert notes[1].startswith("model.attention_impl=auto -> xla (not cuDNN: needs an NVIDIA GPU")
  assert notes[2].startswith("data.num_workers=auto, data.prefetch_threads=2 -> ")
  assert os.listdir(tmp_path / "tensorboard")
  phases = {json.loads(l)["phase"] for l in open(tmp_path / "metrics.jsonl")}
  assert phases == {"train", "val", "val_mask_meta"}  # the final validation masks metadata too
  # Every rank has at most 64 classes, so the confusion plot is of the finest rank below 100%.
  tasks = ["taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40"]
  shown = next((t for t in tasks if val[f"acc1/{t}"] < 100.0), "taxa_L40")
  assert [n for n in os.listdir(tmp_path / "plots") if n.startswith("confusion_")] == [
      f"confusion_{shown}.png"]
  for name in ("meta_ablation.png", f"confusion_{shown}.png",
               "class_accuracy_vs_count_taxa_L10.png"):
    assert os.path.getsize(tmp_path / "plots" / name) > 0
  # The final validation's per-class report adds up to its aggregate top-1.
  report = json.load(open(tmp_path / "eval" / "step_80.json"))
  for t in ("taxa_L10", "taxa_L40"):
    rows = report["val"]["per_class"][t]
    assert sum(r["support"] for r in rows) == val["num_examples"]
    assert 100 * sum(r["correct"] for r in rows) / val["num_examples"] == pytest.approx(
        val[f"acc1/{t}"], rel=1e-9)
  assert (tmp_path / "eval" / "step_80_per_class.csv").exists()
  # The measured masked fraction follows the logged schedule (16 samples a step, 80 steps).
  recs = _train_records(tmp_path)
  p = np.array([recs[s]["schedule/meta_mask_prob"] for s in range(1, 81)])
  assert p[0] == 0.5 and p[-1] == 0.0  # 0.5 -> 0 by half of the 80 steps
  for comp in ("TEMPORAL", "SPATIAL", "ELEVATION"):
    frac = np.array([recs[s][f"meta_masking/masked_frac/{comp}"] for s in range(1, 81)])
    assert abs(frac.mean() - p.mean()) < 4 * np.sqrt(np.sum(p * (1 - p)) * 16) / (80 * 16)
    assert frac[40:].max() == 0.0  # nothing masked once the schedule reaches 0


def test_confusion_rank_is_the_finest_plotted_rank_below_100_percent():
  tasks = ["taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40"]  # fine to coarse
  val = {"acc1/taxa_L10": 40.0, "acc1/taxa_L20": 90.0, "acc1/taxa_L30": 100.0,
         "acc1/taxa_L40": 100.0}
  small = {t: None for t in tasks[1:]}  # taxa_L10: too many classes to plot
  assert train.confusion_rank(val, small, tasks) == "taxa_L20"  # not L10: not plotted
  assert train.confusion_rank(val, {t: None for t in tasks}, tasks) == "taxa_L10"
  val["acc1/taxa_L20"] = 100.0
  assert train.confusion_rank(val, small, tasks) == "taxa_L40"  # all plotted are perfect
  assert train.confusion_rank(val, {"taxa_L20": None, "taxa_L30": None}, tasks) == "taxa_L30"
  val["acc1/taxa_L40"] = 99.9
  assert train.confusion_rank(val, small, tasks) == "taxa_L40"  # the only imperfect one
  assert train.confusion_rank(val, {}, tasks) is None  # no rank small enough


def test_closing_lines_name_the_outputs_and_the_tensorboard_command(tmp_path, monkeypatch):
  from linnaeus_jax.data import images  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(images, "_UNREADABLE", {})  # this process's record, fresh for the test
  w = str(tmp_path / "run")
  assert train.closing_lines(w, 120, True).splitlines() == [
      f"done: step 120 in {w}: checkpoints/ (step 120), metrics.jsonl, config.json, assets/, "
      "eval/step_120.json (+ _per_class.csv), plots/",
      f"  TensorBoard: tensorboard --logdir {w}/tensorboard",
      f"  export: python -m linnaeus_jax.export --workdir={w} --out=BUNDLE_DIR"]
  lines = train.closing_lines(w, 7, False).splitlines()  # no validation: no eval/, no plots/
  assert lines[0] == (f"done: step 7 in {w}: checkpoints/ (step 7), metrics.jsonl, config.json,"
                      " assets/")
  assert lines[1] == f"  TensorBoard: tensorboard --logdir {w}/tensorboard"
  reader = images.ImageReader(str(tmp_path), 8, policy="placeholder")
  for name in ("gone_1", "gone_2", "gone_1"):  # unreadable images met: counted once each
    assert not reader(0, name).any()
  lines = train.closing_lines(w, 7, False).splitlines()
  assert len(lines) == 4 and lines[1].startswith(
      "  2 image(s) were unreadable and left out or zeroed (data.hybrid.missing_image_policy), "
      f"first {tmp_path / 'gone_1.jpg'}: "), lines[1]
  assert lines[2] == f"  TensorBoard: tensorboard --logdir {w}/tensorboard"


def test_head_size_mismatch_with_data_is_an_error(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0])
  c.model.classification.heads.taxa_L10.num_classes = 5
  with pytest.raises(ValueError, match="taxa_L10.num_classes is 5 but the data has 17"):
    resolve_lib.resolve(c)


def _main(*args):
  return subprocess.run([sys.executable, "-m", "linnaeus_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_reports_bad_config_clearly(tmp_path):
  r = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.data.img_size=50",
            "--config.model.rope_mode=spin")
  assert r.returncode == 1
  assert "multiple of 32" in r.stderr and "rope_mode 'spin'" in r.stderr
  r = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.train.stepz=5")
  assert r.returncode != 0 and "stepz" in r.stderr


@pytest.mark.slow
def test_training_stops_after_repeated_non_finite_steps(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0], steps=30, nonfinite_patience=3)
  c.lr_scheduler.base_lr = c.lr_scheduler.warmup_lr = 1e30  # the first update overflows
  c.lr_scheduler.warmup_steps = 0
  workdir = tmp_path / "run"  # made by the run; kept: it failed after writing metrics
  with pytest.raises(FloatingPointError, match="non-finite for 3 steps in a row"):
    train.run(c, str(workdir))
  recs = _train_records(workdir)
  assert max(recs) < 10 and recs[max(recs)]["nonfinite_skips"] == 3
  assert (workdir / "assets" / "class_to_idx.json").exists()


@pytest.mark.slow  # compiles the train step twice (about a minute on 2 shared cores)
def test_a_run_failing_before_any_result_removes_the_workdir_it_made(small_dataset, tmp_path):
  """The first batch fails (no image in the images folder) after the assets are written: a
  workdir the run made goes as a whole; one that existed, with a metrics record, stays."""
  from linnaeus_jax.data import images  # pylint: disable=g-import-not-at-top
  c = tiny_config(small_dataset[0], steps=5)
  c.data.hybrid.images_dir = str(tmp_path / "no_images")
  os.mkdir(c.data.hybrid.images_dir)
  made = tmp_path / "made"
  with pytest.raises(images.MissingImagesError, match="cannot be read"):
    train.run(c, str(made))
  assert not made.exists()  # no run.lock, assets/, tensorboard/ or empty metrics.jsonl left
  old = tmp_path / "old"
  old.mkdir()
  record = json.dumps({"step": 0, "phase": "note", "value": 1}) + "\n"
  (old / "metrics.jsonl").write_text(record)
  with pytest.raises(images.MissingImagesError, match="cannot be read"):
    train.run(c, str(old))
  assert (old / "metrics.jsonl").read_text() == record
  assert (old / "assets" / "class_to_idx.json").exists()  # the run failed after the assets
  assert not os.listdir(old / "checkpoints")


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint_and_stays_stopped(small_dataset, tmp_path):
  c = tiny_config(small_dataset[0], steps=30)
  c.schedule.validation.interval_steps = 5
  c.schedule.checkpoint.keep_last_n, c.schedule.checkpoint.keep_top_n = 1, 1
  c.train.early_stop.update(dict(active=True, metric="val/loss", patience_evals=2,
                                 min_delta=1e9))
  train.run(c, str(tmp_path))  # step 5 is the best; steps 10 and 15 do not improve by 1e9
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [5, 15]
  recs = _train_records(tmp_path)
  assert max(recs) == 15
  train.run(c, str(tmp_path))  # a rerun does not train past the stop: it redoes the final
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]  # validation, once
  assert max(l["step"] for l in lines) == 15
  assert [l["phase"] for l in lines if l["step"] == 15 and l["phase"] != "train"] == [
      "val", "val_mask_meta"]


@pytest.fixture(scope="module")
def null_dataset(tmp_path_factory):
  """A small synthetic dataset where a quarter of the species and a tenth of the genera are null."""
  import dataclasses
  from conftest import SMALL
  from linnaeus_jax.data import synthetic
  out = str(tmp_path_factory.mktemp("nulls"))
  synthetic.generate(out, dataclasses.replace(SMALL, null_species_rate=0.25, null_genus_rate=0.1,
                                              seed=5), verbose=False)
  return out


def _val_logits(workdir):
  """(config, val rows, {task: logits}) of the checkpoint a run left in `workdir`, by hand."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  from linnaeus_jax import config as config_lib, models, preprocessing
  from linnaeus_jax.data import images, labels
  c = config_lib.from_json(open(os.path.join(workdir, "config.json")).read())
  data = labels.load(c)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    s = m.restore(m.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  graphdef, _, _ = nnx.split(nnx.eval_shape(
      lambda: models.build(c, nnx.Rngs(0), data.taxonomy.parents)), nnx.Param, ...)
  reader = images.ImageReader(data.val_images, c.data.img_size)
  pixels = np.stack([reader(int(r), i) for r, i in zip(data.val.raw_row, data.val.image_id)])
  logits = nnx.merge(graphdef, s["params"], s["buffers"])(
      preprocessing.normalize(pixels), data.val.meta, data.val.meta_valid, train=False)
  return c, data, jax.tree.map(np.asarray, logits)


@pytest.mark.slow
def test_val_loss_is_the_train_criterion_nulls_masked_and_weighted(null_dataset, tmp_path):
  """Phase 1 masks nulls in the validation loss too, and `loss` has the training's class and
  task weights (loss.grad_weighting.class.val): val/loss is what training minimises."""
  from linnaeus_jax import losses
  c = tiny_config(null_dataset, steps=6, phase1_mask_null_loss=True)
  c.loss.grad_weighting["class"].update(method="capping", cap=3.0, train=True, val=True)
  c.loss.grad_weighting.task.init_weights = [2.0, 1.0, 0.5, 1.0]
  results = {"val": train.run(c, str(tmp_path))}  # the final validation
  c, data, logits = _val_logits(tmp_path)
  total, total_all = 0.0, 0.0
  for j, (t, w) in enumerate(zip(data.task_keys, [2.0, 1.0, 0.5, 1.0])):
    y = data.val.labels[:, j]
    z = logits[t] - logits[t].max(-1, keepdims=True)
    ce = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(-1)))
    cw = losses.class_weights(np.bincount(data.train.labels[:, j],
                                          minlength=data.num_classes[t]), "capping", cap=3.0)
    keep = y != 0
    assert 0 < keep.sum() < len(y) or j > 1  # the finest ranks do have nulls
    want = np.sum(cw[y][keep] * ce[keep]) / keep.sum()
    np.testing.assert_allclose(results["val"][f"loss/{t}"], want, rtol=2e-4)
    total += w * want
    total_all += ce.mean()
  np.testing.assert_allclose(results["val"]["loss"], total, rtol=2e-4)
  np.testing.assert_allclose(results["val"]["loss_all"], total_all, rtol=2e-4)


@pytest.mark.slow
def test_gradnorm_reforward_handles_nulls_as_the_train_loss(null_dataset, tmp_path):
  """With the same inputs (metadata kept, no dropout, linear heads) GradNorm's task losses are
  the train loss's: nulls kept with the scheduled probability (0 here), not all of them."""
  c = tiny_config(null_dataset, steps=2)
  c.model.drop_path_rate = 0.0
  c.schedule.meta_masking.enabled = False
  c.schedule.null_masking.update(enabled=True, start_prob=0.0, end_prob=0.0)
  gw = c.loss.grad_weighting.task
  gw.type, gw.update_interval, gw.zero_aux_info = "gradnorm", 1, False
  train.run(c, str(tmp_path))
  rec = _train_records(tmp_path)[1]
  for t in c.data.task_keys_h5:
    np.testing.assert_allclose(rec[f"gradnorm/loss/{t}"], rec[f"loss/{t}"], rtol=1e-5, err_msg=t)


def test_resuming_with_another_global_batch_is_refused(small_dataset, trained_workdir, tmp_path):
  """The train order is a function of the step and the global batch: another batch would
  skip or repeat examples, so the run stops naming both batches and touches nothing."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  c = tiny_config(small_dataset[0], steps=40)
  c.data.batch_size = 8
  before = sorted(os.listdir(workdir / "checkpoints"))
  with pytest.raises(ValueError, match=r"\(latest step 20\) were trained with "
                                       r"data.batch_size=16, this run has 8"):
    train.run(c, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


# ----------------------------------------------------------------------------- The run level


def test_the_config_handed_to_training_is_frozen(small_dataset, tmp_path):
  """Resolution returns a FrozenConfigDict with the data's classes and the machine's choices;
  the caller's config is left as it was."""
  c = tiny_config(small_dataset[0])
  c.model.dtype = "auto"
  mesh = train.sharding.make_mesh(c)
  start = resolve_lib.for_training(c, str(tmp_path / "run"), mesh)
  assert isinstance(start.config, ml_collections.FrozenConfigDict)
  with pytest.raises(AttributeError, match="immutable"):
    start.config.data.batch_size = 8
  assert start.config.model.dtype == "float32" and c.model.dtype == "auto"
  assert start.config.model.classification.heads.taxa_L10.num_classes == (
      start.data.num_classes["taxa_L10"]) and c.model.classification.heads.taxa_L10.num_classes == 0
  assert any(n.startswith("model.dtype=auto -> float32") for n in start.config.misc.auto_choices)
  assert not os.path.exists(tmp_path / "run")  # resolution touches no workdir


def test_due_decides_every_periodic_action():
  """Intervals from the durations; validation and checkpoints are not periodic at the last
  step (the run ends with its own), the console line is."""
  c = tiny_config("/unused")
  c.schedule.validation.interval_steps = 4
  c.schedule.validation.mask_meta_interval_fraction = 0.5
  c.schedule.checkpoint.interval_steps = 5
  c.schedule.metrics.console_interval, c.schedule.metrics.tensorboard_interval = 3, 2
  due = train.Due.from_config(c, total=10, spe=100)
  assert due.every == {"log": 2, "console": 3, "validate": 4, "mask_meta": 5, "partial": 0,
                       "checkpoint": 5}
  assert due(4) == {"log", "validate"}
  assert due(5) == {"mask_meta", "checkpoint"}
  assert due(6) == {"log", "console"}
  assert due(10) == {"log", "console"}  # the last step: logs only
  assert due(7) == frozenset()


@pytest.mark.slow
def test_md_trains_with_the_recipe_of_sm_under_the_transfer_guard_with_a_profile(
    small_dataset, tmp_path):
  """configs/mformer.py:md (sm's recipe, shrunk to the test's model and data) trains with
  GradNorm, metadata, partial and null masking and mixing, as its logged schedule values show;
  the loop runs under transfer_guard('disallow'); logging.profile_steps writes a trace."""
  md = config_lib.sibling(os.path.join(ROOT, "configs", "x.py"), "mformer.py", "md")
  c = tiny_config(small_dataset[0], steps=8)
  for key in ("schedule", "loss"):
    c[key] = md[key]
  c.schedule.mix.group_levels = ("taxa_L20",)
  c.schedule.metrics.tensorboard_interval = 1
  c.schedule.checkpoint.interval_steps = 4
  c.loss.grad_weighting.task.update_interval = 2
  c.logging.profile_steps = (2, 4)
  assert c.train.transfer_guard == "disallow"
  workdir = str(tmp_path / "md")
  train.run(c, workdir)
  records = _train_records(workdir)
  assert sorted(records) == list(range(1, 9))
  r = records[8]
  for key in ("schedule/meta_mask_prob", "schedule/partial_mask_prob", "schedule/mix_prob",
              "schedule/null_incl_prob", "gradnorm/weight/taxa_L10", "gradnorm/updated",
              "mix/mixed_batch_frac", "meta_masking/masked_frac/SPATIAL"):
    assert key in r, key
  assert 0 < records[1]["schedule/mix_prob"] and 0 < records[1]["schedule/meta_mask_prob"]
  assert any(records[s]["gradnorm/updated"] for s in records)
  traces = [f for _, _, fs in os.walk(os.path.join(workdir, "tensorboard", "plugins", "profile"))
            for f in fs if f.endswith(".xplane.pb")]
  assert len(traces) == 1


def test_an_implicit_transfer_in_the_loop_fails_under_the_guard(small_dataset, tmp_path,
                                                                monkeypatch):
  """The guard is real: a batch handed to the step as host arrays (an implicit transfer, where
  the loop writes sharding.global_batch) stops the run. (On the CPU only host-to-device
  transfers can be caught: device arrays already live in host memory.)"""
  monkeypatch.setattr(train.sharding, "global_batch", lambda batch, mesh: batch)
  c = tiny_config(small_dataset[0], steps=2)
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    train.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
