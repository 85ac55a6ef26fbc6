import json
import os
import subprocess
import sys

import numpy as np
import pytest

from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax.tools import inspect_dataset

from conftest import ROOT, tiny_config


def test_summary_matches_the_tables(small_dataset):
  c = tiny_config(small_dataset[0])
  c.data.out_of_region.include = False
  c, data = resolve_lib.resolve(c)
  s = inspect_dataset.summary(data, partial=True)
  assert s["rows_used"] == s["rows_train"] + s["rows_val"] == len(data.train) + len(data.val)
  assert s["rows_total"] - s["rows_used"] == sum(s["dropped"].values())
  assert s["dropped"]["out_of_region"] > 0
  labels = np.concatenate([data.train.labels, data.val.labels])
  assert s["tasks"]["taxa_L10"]["null_count"] == int((labels[:, 0] == 0).sum()) > 0
  assert s["tasks"]["taxa_L40"] == {"num_classes": 3, "null_count": 0}
  valid = np.concatenate([data.train.meta_valid, data.val.meta_valid])
  assert s["meta_valid_fraction"]["SPATIAL"] == float(valid[:, 1].mean())
  assert s["meta_nonfinite_rows"] == {"TEMPORAL": 0, "SPATIAL": 0, "ELEVATION": 0}


@pytest.mark.slow
def test_cli_prints_json_and_writes_assets(tmp_path):
  r = subprocess.run([sys.executable, "-m", "linnaeus_jax.tools.inspect_dataset",
                      "--config=configs/demo.py", f"--workdir={tmp_path / 'wd'}",
                      f"--config.data.synthetic.cache_dir={tmp_path / 'cache'}",
                      "--config.data.synthetic.options.max_samples_per_species=6",
                      "--config.data.synthetic.options.min_samples_per_species=6"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["rows_total"] == 48 * 6
  assert set(out["dropped"]) == {"missing_image", "out_of_region", "missing_meta", "all_null",
                                 "any_null", "upward_major"}
  for name in ("class_to_idx.json", "num_classes.json", "taxonomy_tree.json",
               "class_label_counts.json"):
    assert os.path.exists(tmp_path / "wd" / "assets" / name)
  counts = json.load(open(tmp_path / "wd" / "assets" / "class_label_counts.json"))["train"]
  assert sum(counts["taxa_L40"]) == out["rows_train"]
