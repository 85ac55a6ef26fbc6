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
