"""A run's assets: what evaluation, export and inference read besides the checkpoints.

DIR/config.json (the resolved config) and DIR/assets/: class maps, taxonomy, counts, split rows,
taxon names, missing images, and `preprocessing.json`, the image/metadata layout that inference
reproduces.
"""

from __future__ import annotations

import json
import os

import jax

from linnaeus_jax import config as config_lib
from linnaeus_jax import preprocessing
from linnaeus_jax.data import labels as labels_lib


def write(workdir: str, config, data: labels_lib.Dataset) -> None:
  """Writes the assets (process 0 only). Everything is computed before the first file is
  written, and each file is replaced whole: a failure leaves the earlier files, never a
  half-written one."""
  if jax.process_index() != 0:
    return
  folder = os.path.join(workdir, "assets")
  texts = {os.path.join(folder, "preprocessing.json"):
           json.dumps(preprocessing.record(config), indent=1),
           os.path.join(workdir, "config.json"): config_lib.to_json(config)}
  if data.missing_images:
    path = config.data.hybrid.verify_images.report_path or os.path.join(
        folder, "missing_images.json")
    texts[path] = json.dumps(data.missing_images, indent=1)
  data.write_assets(folder)
  for path, text in texts.items():
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
