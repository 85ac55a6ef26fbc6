"""Device mesh and shardings: the batch is split over the `data` axis, the state replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(config) -> jax.sharding.Mesh:
  n = jax.device_count() if config.mesh.data in (-1, 0) else int(config.mesh.data)
  if n != jax.device_count():
    raise ValueError(f"mesh.data={n} but {jax.device_count()} devices are visible")
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
