import jax
import numpy as np
import pytest

from linnaeus_jax import sharding
from linnaeus_jax import config as config_lib


def test_global_batch_is_sharded_on_the_data_axis():
  c = config_lib.base_config()
  mesh = sharding.make_mesh(c)
  assert mesh.shape == {"data": jax.device_count()}
  batch = {"image": np.zeros((4, 2, 2, 3), np.uint8), "labels": {"t": np.arange(4)}}
  g = sharding.global_batch(batch, mesh)
  assert g["image"].shape == (4, 2, 2, 3)
  assert g["labels"]["t"].sharding.spec == jax.sharding.PartitionSpec("data")
  np.testing.assert_array_equal(g["labels"]["t"], np.arange(4))


def test_mesh_size_must_match_devices():
  c = config_lib.base_config()
  c.mesh.data = jax.device_count() + 1
  with pytest.raises(ValueError, match="devices are visible"):
    sharding.make_mesh(c)
