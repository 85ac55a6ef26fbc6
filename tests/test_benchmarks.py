"""The accelerator benchmark's dry run: the whole script, every section, on this CPU."""

import json
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_accelerator_script_dry_run_measures_every_section(tmp_path):
  r = subprocess.run(["bash", "benchmarks/accelerator.sh", "--dry_run", f"--out={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  res = json.load(open(tmp_path / "accelerator.json"))
  assert res["errors"] == {} and res["skipped"] == {}, res
  s = res["sections"]
  assert s["env"]["device"].startswith("cpu") and s["env"]["peak_bf16_tflops"] > 0
  (step,) = s["train"]
  assert step["batch"] == 4 and step["dtype"] == "bfloat16" and step["step_ms"] > 0
  eager = s["original"]["eager"]  # torch is optional: measured, or skipped with the reason
  assert eager.get("skipped") or eager["step_ms"] > 0
  for source in ("jpeg folder", "shards"):
    assert s["pipeline"][source]["img_s"] > 0
  assert [row["batch"] for row in s["inference"]] == [1, 4]
  (cudnn,) = s["variants"]  # cuDNN's attention on a CPU: reported, and the run goes on
  assert "cuDNN" in cudnn["error"]
  search = s["largest"]["search"]
  assert search["bytes"] <= search["budget"] and search["batch"] % 2 == 0
  md = (tmp_path / "accelerator.md").read_text()
  assert "## Train step" in md and "## Largest batch" in md


def _cost_model():
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import cost_model  # pylint: disable=g-import-not-at-top
  return cost_model


def test_cost_model_counts_collective_bytes_of_hlo_by_hand():
  hlo = """
  %all-reduce.1 = (f32[500]{0}, f32[200,2]{1,0}, /*index=2*/f32[100]{0}) all-reduce(%p, %q, %r)
  %ag.2 = bf16[4,256]{1,0} all-gather(bf16[1,256]{1,0} %x), dimensions={0}
  %rs.3 = (f32[250]{0}, f32[10]{0}) reduce-scatter(f32[1000]{0} %g, f32[40]{0} %h)
  %add.4 = f32[1000]{0} add(f32[1000]{0} %p, f32[1000]{0} %p)
  """
  got = _cost_model().hlo_collectives(hlo, 4)
  # Ring on 4 devices: all-reduce 2 x 3/4 x 4000 B; all-gather 3/4 x 2048 B of result;
  # reduce-scatter 3 x the 1040 B shard each device keeps.
  assert got == {"all-reduce": 6000.0, "all-gather": 1536.0, "reduce-scatter": 3120.0}


def test_cost_model_shards_the_state_as_the_mesh_does():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  params = {"w": f32(8, 64), "b": f32(3)}  # w: 512 elements, split 4 ways; b: too small
  state = {"params": params, "mu": params, "nu": params}
  cm = _cost_model()
  data = cm.paper(params, state, "data", 4, min_size=64)
  assert data["state"] == 3 * (2048 + 12)
  assert data["all-reduce"] == 2 * 3 / 4 * (2048 + 12) and data["all-gather"] == 0
  fsdp = cm.paper(params, state, "fsdp", 4, min_size=64)
  assert fsdp["state"] == 3 * (2048 / 4 + 12)
  assert fsdp["all-gather"] == 2 * 3 / 4 * 2048  # forward and backward
  assert fsdp["reduce-scatter"] == 3 / 4 * 2048 and fsdp["all-reduce"] == 2 * 3 / 4 * 12


TINY = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config

def get_config():
  c = tiny_config({data!r}, steps=4)
  c.schedule.validation.partial_mask_meta.enabled = True
  c.schedule.validation.partial_mask_meta.whitelist = (("SPATIAL",),)
  return c
"""


@pytest.mark.slow
def test_experiments_runner_tabulates_a_tiny_suite_and_does_not_rerun(small_dataset, tmp_path):
  """Two variants, one seed, 4 steps: the table holds each run's final validation as written
  in its report; run again, nothing is retrained and the table is the same, and another suite's
  variant of the same configuration reuses the runs. The variants differ in what does not change
  the computation (so the second reuses the first's compilations), and give the same numbers."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import experiments  # pylint: disable=g-import-not-at-top
  config = tmp_path / "tiny.py"
  config.write_text(TINY.format(tests=os.path.join(ROOT, "tests"), data=small_dataset[0]))
  variants = {"keep 2": [], "keep 1": ["--config.schedule.checkpoint.keep_last_n=1"]}
  metrics = [("val", "acc1/taxa_L10"), ("val_mask_SPATIAL", "acc1/taxa_L10"),
             ("val_mask_meta", "loss")]
  args = ("tiny", variants, metrics, ("val", "acc1/taxa_L10"), str(config), 1,
          str(tmp_path / "runs"), str(tmp_path / "out"))
  numbers = experiments.run_suite(*args)
  table = (tmp_path / "out" / "tiny.md").read_text()
  run = {v: os.path.join(experiments.run_dir(str(tmp_path / "runs"), str(config), o, 0), "seed_0")
         for v, o in variants.items()}
  for variant in variants:
    report = experiments.report_of(run[variant])
    for p, m in metrics:
      assert numbers[variant][f"{p}/{m}"] == [report[p][m]]
    row = [l for l in table.splitlines() if l.startswith(f"| {variant} |")][0]
    assert row == f"| {variant} | " + " | ".join(f"{report[p][m]:.1f}" for p, m in metrics) + " |"
  assert numbers["keep 2"] == numbers["keep 1"]  # the same seed, the same computation
  keep = lambda v: json.load(open(os.path.join(run[v], "config.json")))["schedule"][
      "checkpoint"]["keep_last_n"]
  assert (keep("keep 2"), keep("keep 1")) == (2, 1)  # each variant's overrides were applied
  assert (tmp_path / "out" / "tiny.png").stat().st_size > 0
  mtimes = sorted((p, p.stat().st_mtime) for p in (tmp_path / "runs").rglob("step_*.json"))
  assert experiments.run_suite(*args) == numbers
  # Another suite's variant with the same configuration reuses its runs: nothing is trained.
  other = experiments.run_suite("other", {"baseline": []}, metrics[:1], metrics[0], *args[4:])
  assert other["baseline"] == {"val/acc1/taxa_L10": numbers["keep 2"]["val/acc1/taxa_L10"]}
  assert (tmp_path / "out" / "tiny.md").read_text().splitlines()[4:] == table.splitlines()[4:]
  assert sorted((p, p.stat().st_mtime) for p in (tmp_path / "runs").rglob("step_*.json")) == mtimes
  assert experiments.mean_std([1.0, 2.0, 3.0]) == "2.0 ± 1.0"


@pytest.mark.slow
def test_experiments_runner_refuses_a_suite_with_a_bad_variant_before_training(small_dataset,
                                                                               tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import experiments  # pylint: disable=g-import-not-at-top
  config = tmp_path / "tiny.py"
  config.write_text(TINY.format(tests=os.path.join(ROOT, "tests"), data=small_dataset[0]))
  variants = {"fine": [], "no end": ["--config.schedule.null_masking.enabled=true"]}
  with pytest.raises(ValueError, match=r"\n  no end: error: Invalid config: schedule.null_masking "
                                       r"ramps 0.0 -> 1.0 but has no end"):
    experiments.run_suite("bad", variants, [("val", "loss")], ("val", "loss"), str(config), 1,
                          str(tmp_path / "runs"), str(tmp_path / "out"))
  assert not list((tmp_path / "runs").rglob("checkpoints")) and not (tmp_path / "out").exists()
