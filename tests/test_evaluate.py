import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linnaeus_jax import config as config_lib, evaluate, models, preprocessing, sharding
from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax import state as state_lib, train, train_step
from linnaeus_jax.data import images, pipeline

from conftest import tiny_config


def test_phase_names_and_the_exhaustive_count(small_dataset):
  c = tiny_config(small_dataset[0])  # TEMPORAL, SPATIAL, ELEVATION
  c.schedule.validation.partial_mask_meta.whitelist = [["SPATIAL"], ["TEMPORAL", "ELEVATION"]]
  assert [n for n, _ in evaluate.phases(c, mask_meta=False)] == ["val"]
  assert dict(evaluate.phases(c)) == {"val": (), "val_mask_meta": ("TEMPORAL", "SPATIAL",
                                                                    "ELEVATION")}
  names = [n for n, _ in evaluate.phases(c, mask_meta=False, partial=True)]
  assert names == ["val", "val_mask_SPATIAL", "val_mask_TEMPORAL_ELEVATION"]
  exhaustive = dict(evaluate.phases(c, mask_meta=False, exhaustive=True))
  assert len(exhaustive) - 1 == 2 ** 3 - 2
  assert list(exhaustive)[1:] == [
      "val_mask_TEMPORAL", "val_mask_SPATIAL", "val_mask_ELEVATION", "val_mask_TEMPORAL_SPATIAL",
      "val_mask_TEMPORAL_ELEVATION", "val_mask_SPATIAL_ELEVATION"]
  c.schedule.validation.final_epoch.exhaustive_meta_components = ["SPATIAL", "ELEVATION"]
  assert [n for n, _ in evaluate.phases(c, mask_meta=False, exhaustive=True)] == [
      "val", "val_mask_SPATIAL", "val_mask_ELEVATION"]
  c.schedule.validation.partial_mask_meta.whitelist = [["SPATIAL", "ALTITUDE"]]
  with pytest.raises(config_lib.ConfigError, match=r"\['ALTITUDE'\] not among the enabled"):
    config_lib.validate(c)


def test_the_eval_step_standardises_with_the_configs_mean_and_std(small_dataset):
  mean, std = np.array([0.5, 0.25, 0.125]), np.array([0.2, 0.4, 0.8])
  c = tiny_config(small_dataset[0])
  c.data.image_mean, c.data.image_std = tuple(mean), tuple(std)
  c, data = resolve_lib.resolve(c)
  # N(0, 0.5) parameters drawn in numpy: an initialisation (eager or jitted) costs more than the
  # rest of the test, and its small layer scales make the logits barely depend on the image.
  graphdef, params, buffers = models.abstract(c)
  draw = lambda x, rng=np.random.default_rng(0): rng.normal(0, 0.5, x.shape).astype(x.dtype)
  variables = jax.tree.map(draw, (nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)))
  consts = state_lib.loss_constants(c, data)
  batch = jax.tree.map(jnp.asarray, next(iter(pipeline.eval_dataset(data, c))))
  cfg = train_step.StepConfig.from_config(c)
  got, _, _ = jax.jit(evaluate.make_eval_step(graphdef, cfg))(variables, batch, consts)["val"]

  @jax.jit
  def by_hand(image):  # the model on an image normalised here, then the shared loss and counts
    logits = nnx.merge(graphdef, *variables)(image, batch["meta"], batch["meta_valid"],
                                             train=False)
    return train_step.losses_and_counts(cfg, logits, batch, consts, train=False)[1]
  x = np.asarray(batch["image"], np.float32) / 255
  want, unstandardised = by_hand((x - mean) / std), by_hand(x)
  keys = [f"loss_sum/{t}" for t in data.task_keys]
  for k in keys:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
  # Far beyond that tolerance: the [0, 1] image gives other losses.
  diff = sum(abs(float(got[k]) - float(unstandardised[k])) for k in keys)
  assert diff > 1e-3 * sum(float(want[k]) for k in keys)


@pytest.mark.slow
def test_masked_passes_in_one_call_equal_direct_forwards(small_dataset):
  c = tiny_config(small_dataset[0])
  c.data.batch_size_val = 24  # the last batch is padded
  c.schedule.validation.partial_mask_meta.whitelist = [["SPATIAL"]]
  c, data = resolve_lib.resolve(c)
  mesh = sharding.make_mesh(c)
  graphdef, params, buffers = nnx.split(models.build(c, nnx.Rngs(0)), nnx.Param, ...)
  variables = (nnx.to_pure_dict(params), nnx.to_pure_dict(buffers))
  order = sorted(k for k in data.class_to_idx["taxa_L40"] if k != "null")[0]
  c = config_lib.with_changes(c, {"metrics.taxa_subsets": [["first_order", "taxa_L40", order]]})
  plist = evaluate.phases(c, partial=True)
  step = jax.jit(evaluate.make_eval_step(graphdef, train_step.StepConfig.from_config(c), plist))
  got = evaluate.run(step, variables, pipeline.eval_dataset(data, c), mesh, data.task_keys,
                     state_lib.loss_constants(c, data))
  assert set(got) == {"val", "val_mask_meta", "val_mask_SPATIAL"}
  assert len(data.val) % 24 and got["val"]["num_examples"] == len(data.val)

  reader = images.ImageReader(data.val_images, c.data.img_size)
  pixels = np.stack([reader(int(r), i) for r, i in zip(data.val.raw_row, data.val.image_id)])
  forward = jax.jit(lambda x, m, v: nnx.merge(graphdef, *variables)(x, m, v))
  spatial = [n for n, _ in config_lib.enabled_components(c)].index("SPATIAL")
  for phase, cleared in (("val", []), ("val_mask_meta", [0, 1, 2]),
                         ("val_mask_SPATIAL", [spatial])):
    valid = data.val.meta_valid.copy()
    valid[:, cleared] = False  # exactly the named components' flags
    logits = forward(preprocessing.normalize(pixels), data.val.meta, valid)
    in_order = data.val.labels[:, 3] == data.class_to_idx["taxa_L40"][order]
    assert 0 < in_order.sum() < len(in_order)
    for j, t in enumerate(data.task_keys):
      right = np.argmax(logits[t], -1) == data.val.labels[:, j]
      np.testing.assert_allclose(got[phase][f"acc1/{t}"], 100 * np.mean(right), rtol=1e-6)
      np.testing.assert_allclose(got[phase][f"subset_acc1/first_order/{t}"],
                                 100 * np.mean(right[in_order]), rtol=1e-6)
  assert got["val"]["loss"] != got["val_mask_meta"]["loss"]


@pytest.mark.slow
def test_evaluate_a_checkpoint_reproduces_the_final_validation(small_dataset, tmp_path):
  import json
  c = tiny_config(small_dataset[0], steps=10)
  c.schedule.validation.partial_mask_meta.whitelist = [["SPATIAL"]]
  train.run(c, str(tmp_path))
  step, results, rows = evaluate.evaluate_checkpoint(c, str(tmp_path))
  assert step == 10 and len(results) == 1 + 1 + (2 ** 3 - 2)  # val, mask_meta, exhaustive
  n = results["val"]["num_examples"]
  heads = json.load(open(tmp_path / "config.json"))["model"]["classification"]["heads"]
  for t, task_rows in rows.items():  # per class, adding up to the aggregate top-1
    assert len(task_rows) == heads[t]["num_classes"]
    assert sum(r["support"] for r in task_rows) == n
    assert 100 * sum(r["correct"] for r in task_rows) / n == pytest.approx(
        results["val"][f"acc1/{t}"], rel=1e-9)
    assert sum(r["predicted"] for r in task_rows) == n
  logged = {r["phase"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
            if r["phase"] != "train"}
  for phase in ("val", "val_mask_meta"):
    for key in ("loss", "acc1/taxa_L10", "chain_accuracy"):
      assert results[phase][key] == pytest.approx(logged[phase][key], rel=1e-6)
  with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
    evaluate.evaluate_checkpoint(c, str(tmp_path), step=7)
  # The command without --config evaluates with the run's own DIR/config.json.
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.evaluate", f"--workdir={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  written = json.load(open(tmp_path / "eval" / "step_10.json"))
  assert set(written) == set(results) and written["val"]["per_class"] == rows
  out = r.stdout.splitlines()
  i = out.index("step 10: top-1 (%) per rank")  # a table: ranks coarse to fine, phases sorted
  assert out[i + 1].split() == ["phase", "loss", "taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"]
  table = {line.split()[0]: line.split()[1:] for line in out[i + 2:i + 2 + len(results)]}
  assert list(table) == sorted(results)
  assert table["val"] == [f"{results['val']['loss']:.4f}"] + [
      f"{results['val'][f'acc1/{t}']:.1f}" for t in ("taxa_L40", "taxa_L30", "taxa_L20",
                                                    "taxa_L10")]
  j = out.index("worst taxa on val (top-1 of its val examples, its train examples):")
  worst = out[j + 1:j + 5]
  assert [line.split()[0] for line in worst] == ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"]
  first = min((r for r in rows["taxa_L10"] if r["support"] and r["taxon_id"] != 0),
              key=lambda r: (r["top1"], -r["support"], r["class"]))
  assert worst[3].startswith(f"  taxa_L10   {first['name']} {first['top1']:.0f}% of "
                             f"{first['support']} (train {first['train_count']})"), worst[3]
  import csv  # pylint: disable=g-import-not-at-top
  lines = list(csv.DictReader(open(tmp_path / "eval" / "step_10_per_class.csv")))
  assert len(lines) == sum(len(v) for v in rows.values())
  assert lines[0]["task"] == "taxa_L10" and int(lines[0]["support"]) == rows["taxa_L10"][0]["support"]
  assert lines[0]["name"] == rows["taxa_L10"][0]["name"] == "null"  # class 0: the null class
  for phase in results:
    assert written[phase]["loss"] == pytest.approx(results[phase]["loss"], rel=1e-5), phase


def test_results_table_names_the_ranks_coarse_to_fine():
  """Header: phase, loss, then the ranks coarsest first (task_keys reversed); each phase's
  values in that order, right-aligned under their rank."""
  results = {"val": {"loss": 1.5, "acc1/taxa_L10": 50.0, "acc1/taxa_L20": 87.5},
             "val_mask_meta": {"loss": 2.25, "acc1/taxa_L10": 25.0, "acc1/taxa_L20": 62.54}}
  lines = evaluate.results_table(results, ["taxa_L10", "taxa_L20"])
  assert lines == [
      "  phase" + " " * 29 + "loss" + " " * 3 + "taxa_L20" + " " * 3 + "taxa_L10",
      "  val" + " " * 29 + "1.5000" + " " * 7 + "87.5" + " " * 7 + "50.0",
      "  val_mask_meta" + " " * 19 + "2.2500" + " " * 7 + "62.5" + " " * 7 + "25.0"]
  for line in lines[1:]:  # each value ends under its rank's name
    assert len(line) == len(lines[0])
  long = "val_mask_TEMPORAL_SPATIAL_ELEV"  # 30 characters: the phase column widens
  lines = evaluate.results_table({long: results["val"]}, ["taxa_L10", "taxa_L20"])
  assert lines[1] == f"  {long}" + " " * 4 + "1.5000" + " " * 7 + "87.5" + " " * 7 + "50.0"
  assert lines[0].index("loss") == lines[1].index("1.5000") + 2


def _row(cls, taxon_id, name, top1, support, train_count):
  return {"class": cls, "taxon_id": taxon_id, "name": name, "top1": top1, "support": support,
          "train_count": train_count, "correct": None, "predicted": None, "precision": None}


def test_worst_summary_names_taxa_coarse_to_fine_without_the_null_class():
  rows = {  # fine to coarse, as per_class_rows gives them
      "taxa_L10": [_row(0, 0, "null", 0.0, 9, 30),  # worst of all, but the null class
                   _row(1, 101, "Quercus alba", 50.0, 4, 10),
                   _row(2, 102, "Quercus rubra", 100.0, 2, 8),
                   _row(3, 103, "Fagus grandifolia", None, 0, 5),  # no val examples
                   _row(4, 104, "104", 50.0, 2, 3)],  # unnamed: its id
      "taxa_L20": [_row(0, 0, "null", 10.0, 5, 12),
                   _row(1, 7, "Quercus", 66.6667, 6, 18), _row(2, 8, "Fagus", 80.0, 5, 5)]}
  assert evaluate.worst_summary(rows) == [
      "  taxa_L20   Quercus 67% of 6 (train 18); Fagus 80% of 5 (train 5)",
      "  taxa_L10   Quercus alba 50% of 4 (train 10); 104 50% of 2 (train 3); "
      "Quercus rubra 100% of 2 (train 8)"]
  assert evaluate.worst_summary(rows, k=1) == ["  taxa_L20   Quercus 67% of 6 (train 18)",
                                               "  taxa_L10   Quercus alba 50% of 4 (train 10)"]
