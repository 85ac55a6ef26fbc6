"""Device mesh and shardings (docs/distributed.md).

The mesh has two axes: `data` and `fsdp`. The batch is split over both (every device holds
B / devices rows); the state is replicated over `data` and, for `fsdp` > 1, each large array of
the train state (parameters and the optimizer's moments alike) is split along its largest dimension
that `fsdp` divides, so that lg/xl fit where a replica would not. XLA inserts the all-gathers
and reduce-scatters; the step's code is the same for every mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) from `config.mesh`; -1 for `data` takes every device left by `fsdp`."""
  fsdp = int(config.mesh.fsdp)
  data = int(config.mesh.data)
  problems = []
  if fsdp < 1 or num_devices % fsdp:
    problems.append(f"mesh.fsdp={fsdp} must be a positive divisor of the {num_devices} devices")
    fsdp = 1
  if data in (-1, 0):
    data = num_devices // fsdp
  if data * fsdp != num_devices:
    problems.append(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} but {num_devices} "
                    "devices are visible (set mesh.data=-1 to use them all)")
  if problems:
    raise ValueError("Invalid mesh:\n  " + "\n  ".join(problems))
  return data, fsdp


def make_mesh(config) -> jax.sharding.Mesh:
  shape = mesh_shape(config, jax.device_count())
  return jax.make_mesh(shape, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """P() or 'fsdp' on the largest dimension divisible by `fsdp` (arrays of >= min_size)."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = sorted((d for d in range(len(shape)) if shape[d] % fsdp == 0),
                key=lambda d: (-shape[d], d))
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = "fsdp"
  return P(*spec)


def state_sharding(mesh, abstract_state, min_size: int = 2**14):
  """A NamedSharding per leaf of the train state: replicated, or split over `fsdp`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_size)),
                      abstract_state)


def check_process_rows(mesh, global_batch_size: int) -> None:
  """Each process feeds rows [i*B/n, (i+1)*B/n) of every global batch (data/pipeline.py); the
  batch sharding must give this process's devices exactly those rows."""
  n, i = jax.process_count(), jax.process_index()
  local = global_batch_size // n
  idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = sorted({r for s in idx.values() for r in range(*s[0].indices(global_batch_size))})
  if rows != list(range(i * local, (i + 1) * local)):
    raise ValueError(f"process {i}: the mesh places rows {rows[0]}..{rows[-1]} of the batch on "
                     f"this process's devices, not its contiguous slice; devices must be ordered "
                     "by process along the mesh")


def global_batch(local_batch: dict, mesh) -> dict:
  """Per-process numpy batch (this process's rows, `check_process_rows`) -> global jax.Arrays
  sharded along the batch axis.

  Each local device's rows are copied by an explicit `jax.device_put`: the train loop runs under
  `jax.transfer_guard(train.transfer_guard)`, whose 'disallow' lets only explicit transfers
  through, and with several processes `jax.make_array_from_process_local_data` transfers
  implicitly."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    n, first = len(x) * jax.process_count(), len(x) * jax.process_index()
    parts = sharding.addressable_devices_indices_map((n,) + x.shape[1:])
    rows = [x[a - first:b - first] for a, b, _ in (i[0].indices(n) for i in parts.values())]
    return jax.make_array_from_single_device_arrays((n,) + x.shape[1:], sharding,
                                                    jax.device_put(rows, list(parts)))
  return jax.tree.map(put, local_batch)
