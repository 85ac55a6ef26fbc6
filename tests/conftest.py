"""Shared fixtures: a small synthetic dataset (made once per session) and a tiny config."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Tests compile many tiny programs and run each a few steps: XLA's backend optimizations would
# cost more compile time than they save (about half the suite's CPU time). Set before jax is
# imported, here and in every subprocess a test starts; results are the same up to rounding.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Many tests (and the subprocesses they start) compile the same programs: JAX's persistent
# compilation cache, one folder per test run (made by the controller, inherited by the xdist
# workers and every subprocess), compiles each once. A cache hit is the same executable, so
# results are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="linnaeus_jax_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from linnaeus_jax import config as config_lib  # noqa: E402
from linnaeus_jax.data import synthetic  # noqa: E402

SMALL = synthetic.SyntheticOptions(num_orders=2, families_per_order=2, genera_per_family=2,
                                   species_per_genus=2, img_size=32, max_samples_per_species=60,
                                   min_samples_per_species=30, seed=3)


def once_per_run(tmp_path_factory, name: str, build) -> str:
  """The folder `name`, filled by `build(folder)` once per test run and shared by the xdist
  workers (the first builds it, the others wait on a lock); read-only for tests."""
  import fcntl  # pylint: disable=g-import-not-at-top
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    root = tmp_path_factory.mktemp(f"{name}_root")
  else:  # the run's base folder, above the workers' own
    root = tmp_path_factory.getbasetemp().parent
  folder = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f"{name}.done").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(str(folder))
      (root / f"{name}.done").touch()
  return str(folder)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
  """(folder, paths) of the SMALL synthetic dataset, made once per test run."""
  out = once_per_run(tmp_path_factory, "synthetic",
                     lambda d: synthetic.generate(d, SMALL, verbose=False))
  return out, {"labels_path": os.path.join(out, "labels.h5"),
               "images_dir": os.path.join(out, "images")}


def tiny_config(dataset_dir: str, **train):
  """A very small mFormerV1 over the session's synthetic dataset."""
  c = config_lib.base_config()
  d = c.data
  d.h5.labels_path = os.path.join(dataset_dir, "labels.h5")
  d.hybrid.use_hybrid = True
  d.hybrid.images_dir = os.path.join(dataset_dir, "images")
  d.img_size = 32
  d.partial.levels = True
  d.meta.components.ELEVATION.enabled = True
  d.batch_size = 16
  d.batch_size_val = 32
  d.prefetch_threads = 2
  c.aug.autoaug.policy = "none"
  c.aug.random_erase.prob = 0.0
  m = c.model
  m.convnext_stages.depths = [1, 1]
  m.convnext_stages.dims = [16, 24, 32, 48]
  m.rope_stages.depths = [1, 1]
  m.rope_stages.dims = [32, 48]
  m.rope_stages.num_heads = [2, 2]
  m.drop_path_rate = 0.1
  c.train.steps = 30
  c.lr_scheduler.base_lr = 3e-3
  c.lr_scheduler.warmup_steps = 5
  c.schedule.meta_masking.end_fraction = 0.5
  c.schedule.meta_masking.start_prob = 0.5
  c.schedule.validation.mask_meta_interval_fraction = 1.0  # only at the end
  c.schedule.checkpoint.interval_steps = 10
  c.schedule.metrics.console_interval = 10
  c.schedule.metrics.tensorboard_interval = 1
  c.train.transfer_guard = "disallow"  # host syncs in the train loop only where written
  for k, v in train.items():
    c.train[k] = v
  return c


def all_dynamics(c):
  """Every training-time random behaviour on: partial masking, null scheduling, mixing,
  taxonomy smoothing, class weights and GradNorm."""
  pm = c.schedule.meta_masking.partial
  pm.enabled, pm.end_fraction = True, 1.0
  pm.whitelist, pm.weights = [["TEMPORAL"], ["SPATIAL", "ELEVATION"]], [2.0, 1.0]
  c.schedule.null_masking.enabled, c.schedule.null_masking.end_fraction = True, 0.5
  mix = c.schedule.mix
  mix.prob.enabled, mix.prob.end_fraction, mix.cutmix.enabled = True, 1.0, True
  c.loss.task_specific.train.funcs = ["TaxonomyAwareLabelSmoothing", "LabelSmoothingCrossEntropy",
                                      "CrossEntropyLoss", "SoftTargetCrossEntropy"]
  c.loss.grad_weighting["class"].method = "smoothing"
  c.loss.grad_weighting.task.type = "gradnorm"
  c.loss.grad_weighting.task.update_interval = 4
  return c


@pytest.fixture(scope="session")
def trained_workdir(small_dataset, tmp_path_factory):
  """A tiny model trained for 20 steps (one checkpoint at the end), for inference tests; made
  once per test run (`once_per_run`), read-only: tests that change it copy it first."""
  from linnaeus_jax import train  # pylint: disable=g-import-not-at-top

  def build(workdir):
    c = tiny_config(small_dataset[0], steps=20)
    c.schedule.checkpoint.interval_steps = 0
    train.run(c, workdir)
  return once_per_run(tmp_path_factory, "trained", build)


def pytest_collection_modifyitems(items):
  """Tests on the trained model (`trained_workdir`, 20 training steps) are slow."""
  for item in items:
    if "trained_workdir" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.slow)
