import json
import subprocess
import sys

import pytest
from flax import nnx

from linnaeus_jax import config as config_lib, models
from linnaeus_jax.tools import model_summary

from conftest import ROOT, tiny_config


def _config(dataset_dir):
  c = tiny_config(dataset_dir)
  for t, n in zip(c.data.task_keys_h5, (5, 4, 3, 2)):
    c.model.classification.heads[t].num_classes = n
  return c


@pytest.mark.slow
def test_counts_and_flops(small_dataset):
  c = _config(small_dataset[0])
  s = model_summary.summary(c)
  _, params = nnx.split(nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0))), nnx.Param)
  params = nnx.to_pure_dict(params)
  assert s["params_total"] == model_summary.count(params)
  assert s["params_heads"] == 48 * (5 + 4 + 3 + 2) + (5 + 4 + 3 + 2)  # D3 = 48, with biases
  assert s["params_meta"] == model_summary.count([params["meta_1"], params["meta_2"]])
  # FLOPs of a scanned model are counted on its unrolled twin (a loop body counts once in XLA).
  c.model.scan_blocks = False
  assert model_summary.summary(c)["gflops_forward"] == s["gflops_forward"] > 0
  c.model.convnext_stages.depths = [2, 1]
  assert model_summary.summary(c)["gflops_forward"] > s["gflops_forward"]


@pytest.mark.slow
def test_cli_prints_json_and_names_missing_classes():
  base = [sys.executable, "-m", "linnaeus_jax.tools.model_summary", "--config=configs/demo.py"]
  r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "num_classes" in r.stderr and "taxa_L10" in r.stderr
  heads = [f"--config.model.classification.heads.{t}.num_classes={n}"
           for t, n in zip(config_lib.TASK_KEYS, (9, 7, 5, 3))]
  r = subprocess.run(base + heads, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert set(out) == {"params_total", "params_meta", "params_heads", "gflops_forward",
                      "compile_seconds"}
  assert out["params_heads"] > 0 and out["gflops_forward"] > 0
