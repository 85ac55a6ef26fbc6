import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from linnaeus_jax import config as config_lib
from linnaeus_jax import sharding


def test_global_batch_is_sharded_on_the_batch_axes():
  c = config_lib.base_config()
  mesh = sharding.make_mesh(c)
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  batch = {"image": np.zeros((4, 2, 2, 3), np.uint8), "labels": {"t": np.arange(4)}}
  g = sharding.global_batch(batch, mesh)
  assert g["image"].shape == (4, 2, 2, 3)
  assert g["labels"]["t"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(g["labels"]["t"], np.arange(4))
  sharding.check_process_rows(mesh, 4)  # one process: all rows are local


def test_mesh_shape_from_config():
  c = config_lib.base_config()
  assert sharding.mesh_shape(c, 8) == (8, 1)
  c.mesh.fsdp = 4
  assert sharding.mesh_shape(c, 8) == (2, 4)
  c.mesh.data = 2
  assert sharding.mesh_shape(c, 8) == (2, 4)


def test_bad_mesh_lists_every_problem():
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp = 3, 3
  with pytest.raises(ValueError) as e:
    sharding.mesh_shape(c, 8)
  assert "mesh.fsdp=3 must be a positive divisor of the 8 devices" in str(e.value)
  assert "mesh.data=3 x mesh.fsdp=1 = 3 but 8 devices are visible" in str(e.value)
  c = config_lib.base_config()
  c.mesh.data = jax.device_count() + 1
  with pytest.raises(ValueError, match="devices are visible"):
    sharding.make_mesh(c)


def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays():
  assert sharding.fsdp_spec((768, 3072), 4, 1024) == P(None, "fsdp")
  assert sharding.fsdp_spec((3072, 768), 4, 1024) == P("fsdp", None)
  assert sharding.fsdp_spec((7, 7, 1, 96), 4, 8192) == P()  # 4704 elements: below min_size
  assert sharding.fsdp_spec((7, 7, 1, 96), 4, 16) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((1001, 769), 4, 16) == P()  # nothing divisible
  assert sharding.fsdp_spec((1001, 768), 4, 16) == P(None, "fsdp")
  assert sharding.fsdp_spec((), 4, 0) == P()
  assert sharding.fsdp_spec((768, 3072), 1, 0) == P()  # fsdp off
