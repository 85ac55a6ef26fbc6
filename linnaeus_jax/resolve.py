"""The config resolved once, then frozen.

Resolution completes a config from the data (each head's classes, the synthetic dataset's
paths), the machine (every 'auto' setting, the batch), the run being resumed (its batch, the
pretrained sources its first start loaded) and model.init (the normalisation of the sources that
loaded). The result is a `FrozenConfigDict` that everything after receives and nothing changes:
it is what DIR/config.json records.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from linnaeus_jax import checkpoint as ckpt_lib
from linnaeus_jax import config as config_lib
from linnaeus_jax import hardware, memory, pretrained, sharding
from linnaeus_jax import state as state_lib
from linnaeus_jax.data import labels as labels_lib
from linnaeus_jax.data import pipeline, synthetic


def resolve(config, num_devices: int = 1
            ) -> tuple[ml_collections.FrozenConfigDict, labels_lib.Dataset]:
  """Validates `config`, loads the data and returns (frozen config, dataset): the config with
  the synthetic dataset's paths and each head's `num_classes` as found in the data."""
  config, data = _with_data(config, num_devices)
  return config_lib.freeze(config), data


def _with_data(config, num_devices: int):
  config = config_lib.with_defaults(config)
  config_lib.validate(config, num_devices)
  changes = {}
  if config.data.synthetic.enabled and not config.data.h5.labels_path:
    changes.update(_synthetic_paths(config.data.synthetic))
  config = config_lib.with_changes(config, changes)
  data = labels_lib.load(config)
  problems = []
  for task in data.task_keys:
    head = config.model.classification.heads[task]
    if head.num_classes and head.num_classes != data.num_classes[task]:
      problems.append(f"model.classification.heads.{task}.num_classes is {head.num_classes} but "
                      f"the data has {data.num_classes[task]} classes")
  if problems:
    raise config_lib.ConfigError("Invalid config:\n  " + "\n  ".join(problems))
  classes = {f"model.classification.heads.{t}.num_classes": data.num_classes[t]
             for t in data.task_keys}
  return config_lib.with_changes(config, classes), data


def _synthetic_paths(s) -> dict:
  """The built-in synthetic dataset's paths (generated into the cache on first use; with
  several processes, process 0 generates and the others wait)."""
  make = lambda: synthetic.ensure(synthetic.SyntheticOptions(**s.options.to_dict()),
                                  s.cache_dir or None)
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      make()
    multihost_utils.sync_global_devices("synthetic dataset")
  paths = make()
  if "images_dir" in paths:
    return {"data.h5.labels_path": paths["labels_path"], "data.hybrid.use_hybrid": True,
            "data.hybrid.images_dir": paths["images_dir"]}
  return {"data.h5.labels_path": paths["labels_path"],
          "data.h5.images_path": paths["images_path"]}


@dataclasses.dataclass(frozen=True)
class Run:
  """A training run's starting point: the frozen config, the data, the steps already saved in
  the workdir, and model.init's (weights, report) when the run starts fresh from them."""
  config: ml_collections.FrozenConfigDict
  data: labels_lib.Dataset
  saved_steps: list[int]
  init_weights: tuple | None


def for_training(config, workdir: str, mesh) -> Run:
  """`resolve`, then the run's own choices: 'auto' settings (printed, recorded in
  misc.auto_choices), a resumed run's batch, model.init's weights and normalisation. Everything
  is read and checked before the workdir is touched."""
  config, data = _with_data(config, jax.device_count())
  steps = ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints"))
  if steps and not config.train.auto_resume:
    raise FileExistsError(f"{workdir} already holds checkpoints (latest step {steps[-1]}) and "
                          "resuming is off (--resume=false / train.auto_resume=False); refusing "
                          "to overwrite them: use a new --workdir")
  earlier = os.path.join(workdir, "config.json")
  earlier = config_lib.read_json(earlier) if steps and os.path.exists(earlier) else None
  changes, notes = hardware.choices(config)
  config = config_lib.with_changes(config, changes)
  config, batch_notes = _batch(config, data, mesh, earlier,
                               f"{workdir} (latest step {steps[-1]})" if steps else "")
  notes += batch_notes
  init_weights, config = _init(config, data, workdir, resuming=bool(steps))
  for note in notes:
    if jax.process_index() == 0:
      print(f"auto: {note}", flush=True)
  config = config_lib.with_changes(config, {"misc.auto_choices": tuple(notes)})
  config_lib.validate(config, jax.device_count())
  sharding.check_process_rows(mesh, config.data.batch_size)
  return Run(config_lib.freeze(config), data, steps, init_weights)


def _batch(config, data, mesh, earlier, where: str = ""
           ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """data.batch_size: 'auto' becomes the resumed run's own batch (its data position depends on
  it) or the largest that fits (memory.py); a resumed run (`earlier`: its config, `where`: its
  checkpoints) keeps the batch it was trained with."""
  if earlier is not None and config.data.batch_size not in ("auto", earlier.data.batch_size):
    raise ValueError(f"the checkpoints in {where} were trained with data.batch_size="
                     f"{earlier.data.batch_size}, this run has {config.data.batch_size}: the "
                     "train order and the step count depend on it, so resume with the same "
                     "global batch")
  if config.data.batch_size != "auto":
    return config, []
  if earlier is not None:
    return (config_lib.with_changes(config, {"data.batch_size": earlier.data.batch_size}),
            [f"data.batch_size=auto -> {earlier.data.batch_size}, the batch of the run being "
             "resumed"])
  if jax.process_index() == 0:
    print("auto: data.batch_size=auto: compiling the train step at a few batches for their "
          "memory", flush=True)
  batch, notes = memory.auto_batch(config, mesh, state_lib.loss_constants(config, data),
                                   pipeline.padding_record(data, config), data.taxonomy.parents)
  return config_lib.with_changes(config, {"data.batch_size": batch}), notes


def _init(config, data, workdir: str, resuming: bool):
  """(model.init's (weights, report), or None when resuming or without sources; the config
  with the normalisation of the sources that loaded: on resume, those of its first start)."""
  if not pretrained.enabled(config):
    return None, config
  if resuming:  # the run's own checkpoint wins over model.init
    report, weights = pretrained.read_report(workdir), None
  else:
    weights, report = pretrained.load(config, data.class_to_idx)
  loaded = None if report is None else pretrained.loaded_sources(report)
  changes, note = pretrained.normalization(config, loaded)
  if weights is not None:
    report["normalization"] = note
    return (weights, report), config_lib.with_changes(config, changes)
  return None, config_lib.with_changes(config, changes)
