"""The 'auto' settings: each rule, and `resolve` on this (CPU) machine."""

import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import tiny_config
from linnaeus_jax import config as config_lib
from linnaeus_jax import hardware, models
from linnaeus_jax.models import rope


@pytest.mark.parametrize("cores,expected", [
    (1, (0, 2)), (2, (0, 2)), (4, (0, 4)),  # small hosts: threads in the training process
    (5, (3, 2)), (16, (14, 2)), (64, (32, 2)),  # a worker per core but two, at most 32
])
def test_data_workers_follow_the_cores(cores, expected):
  assert hardware.data_workers("auto", "auto", cores) == expected
  assert hardware.data_workers(3, "auto", cores) == (3, expected[1])  # set values are kept
  assert hardware.data_workers("auto", 7, cores) == (expected[0], 7)


def test_on_a_cpu_auto_is_float32_and_xla_attention():
  assert hardware.platform() == "cpu"
  assert hardware.compute_dtype("auto") == "float32"
  assert hardware.compute_dtype("bfloat16") == "bfloat16"
  why = hardware.cudnn_attention_problem("bfloat16", [64])
  assert why.startswith("needs an NVIDIA GPU (the devices are cpu"), why
  assert hardware.attention_impl("auto", "bfloat16", [64]) == ("xla", f"not cuDNN: {why}")
  assert hardware.attention_impl("cudnn", "float32", [64]) == ("cudnn", "set")


def test_resolve_replaces_every_auto_and_says_why():
  c = tiny_config("/unused")
  c.data.prefetch_threads = "auto"
  assert (c.model.dtype, c.model.attention_impl, c.data.num_workers) == ("auto",) * 3
  changes, notes = hardware.choices(c)
  workers, threads = hardware.data_workers("auto", "auto")
  assert changes == {"model.dtype": "float32", "model.attention_impl": "xla",
                     "data.num_workers": workers, "data.prefetch_threads": threads}
  assert c.model.dtype == "auto"  # the config itself is left as it is
  assert len(notes) == 3 and f"{hardware.host_cores()} cores" in notes[2]
  assert hardware.choices(config_lib.with_changes(c, changes)) == ({}, [])  # nothing left
  assert hardware.choices(config_lib.with_changes(c, {"model.dtype": "bfloat16"}))[0].get(
      "model.dtype") is None  # a set value is never changed


def test_an_unresolved_config_builds_the_resolved_model():
  """Entry points that build a model straight from a config (export, tools) get the choices."""
  c = tiny_config("/unused")
  for t, n in zip(c.data.task_keys_h5, (5, 4, 3, 2)):
    c.model.classification.heads[t].num_classes = n
  model = nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0)))
  attention = [m for _, m in nnx.iter_graph(model) if isinstance(m, rope.Attention)]
  assert model.dtype == jnp.float32 and attention
  assert all(a.impl is None for a in attention)  # None: XLA's attention
  c.model.dtype = "bfloat16"
  assert nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0))).dtype == jnp.bfloat16
