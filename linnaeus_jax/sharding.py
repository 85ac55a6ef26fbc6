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
  """Per-process numpy batch -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def device_memory(device) -> tuple[int | None, str]:
  """(bytes one device can use, what that is): the accelerator's limit, or on CPU the host's
  available memory shared by its devices (None where unknown)."""
  limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
  if limit:
    return int(limit), f"device {device.device_kind}"
  try:
    with open("/proc/meminfo") as f:
      kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError):
    return None, "the host"
  n = jax.local_device_count()
  return kib * 1024 // n, f"the host's available memory / {n} device(s)"


def check_memory(compiled, what: str = "the train step") -> int:
  """Raises ValueError if `compiled` needs more memory per device than a device has, from XLA's
  memory analysis (arguments, outputs not aliased to them, temporaries, code), before anything
  is allocated; returns the bytes it needs."""
  ma = compiled.memory_analysis()
  if ma is None:
    return 0
  need = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
  have, where = device_memory(jax.local_devices()[0])
  gib = lambda n: f"{n / 2**30:,.2f} GiB"
  if have is not None and need > have:
    raise ValueError(
        f"{what} needs {gib(need)} per device (state and batch {gib(ma.argument_size_in_bytes)}, "
        f"temporaries {gib(ma.temp_size_in_bytes)}) but {where} has {gib(have)}: lower "
        "data.batch_size (train.accumulation_steps keeps the batch in micro-batches), "
        "data.img_size or the model size, or shard the state with mesh.fsdp")
  return need
