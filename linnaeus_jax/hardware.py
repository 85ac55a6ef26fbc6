"""What the `'auto'` settings become on the hardware at hand.

`model.dtype`, `model.attention_impl`, `data.num_workers` and `data.prefetch_threads` may be
`'auto'` (their defaults). Each has a pure rule here, applied wherever a model or a pipeline is
built, so that any entry point works with an unresolved config; `resolve` applies them all to
a config up front and says what it chose and why, for training to print and record in
`config.json`. (`data.batch_size='auto'` is resolved by `memory.py`, which needs the model.)
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

AUTO = "auto"


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the default devices."""
  return jax.devices()[0].platform


def host_cores() -> int:
  """CPU cores this process may run on (the affinity mask, e.g. a container's share)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def compute_dtype(value: str) -> str:
  """'auto': bfloat16 on GPUs and TPUs (their matrix units' native type), float32 on CPUs."""
  if value != AUTO:
    return value
  return "bfloat16" if platform() in ("gpu", "tpu") else "float32"


def data_workers(num_workers, prefetch_threads, cores: int | None = None) -> tuple[int, int]:
  """(Grain worker processes, reading threads) for the host's cores, for each value that is
  'auto'. Up to 4 cores: no worker processes (they would compete with the training loop), one
  reading thread per core (at least 2: decoding waits on I/O). More: a worker process per core
  but two (left to the training loop and the host-to-device copies), up to 32, with 2 threads
  each."""
  cores = host_cores() if cores is None else cores
  workers = 0 if cores <= 4 else min(cores - 2, 32)
  threads = 2 if workers else max(2, cores)
  return (workers if num_workers == AUTO else int(num_workers),
          threads if prefetch_threads == AUTO else int(prefetch_threads))


def cudnn_attention_problem(dtype: str, head_dims) -> str | None:
  """Why cuDNN's fused attention cannot run this model here (None if it can): it needs an NVIDIA
  GPU, bfloat16/float16, head dims that are multiples of 8 and at most 128 (256 on Hopper and
  newer); then a forward and backward pass of it is compiled and run once per head dim, so that
  a missing or incompatible cuDNN shows up here rather than in the train step."""
  dev = jax.devices()[0]
  if dev.platform != "gpu" or not hasattr(dev, "compute_capability"):  # CUDA devices have one
    return f"needs an NVIDIA GPU (the devices are {dev.platform}: {dev.device_kind})"
  if dtype not in ("bfloat16", "float16"):
    return f"needs bfloat16 or float16 compute (model.dtype is {dtype})"
  cc = float(getattr(dev, "compute_capability", "0") or 0)
  limit = 256 if cc >= 9.0 else 128
  bad = sorted({h for h in head_dims if h % 8 or h > limit})
  if bad:
    return f"head dims {bad} are not multiples of 8 up to {limit}"
  for h in sorted(set(head_dims)):
    if (why := _cudnn_probe(h, dtype)):
      return why
  return None


@functools.cache
def _cudnn_probe(head_dim: int, dtype: str) -> str | None:
  q = jnp.ones((2, 40, 2, head_dim), dtype)

  def loss(q):
    return jax.nn.dot_product_attention(q, q, q, implementation="cudnn").astype(
        jnp.float32).sum()
  try:
    jax.block_until_ready(jax.jit(jax.grad(loss))(q))
  except Exception as e:  # pylint: disable=broad-except  (any failure means: not usable here)
    return f"cuDNN attention failed to run: {str(e).strip().splitlines()[0][:200]}"
  return None


def head_dims(config) -> list[int]:
  rs = config.model.rope_stages
  return [d // h for d, h in zip(rs.dims, rs.num_heads)]


def attention_impl(value: str, dtype: str, dims) -> tuple[str, str]:
  """(implementation, reason): 'auto' is cuDNN's fused attention where it runs, else XLA's."""
  if value != AUTO:
    return value, "set"
  why = cudnn_attention_problem(dtype, dims)
  return ("xla", f"not cuDNN: {why}") if why else ("cudnn", "cuDNN fused attention runs here")


def choices(config) -> tuple[dict, list[str]]:
  """({key: choice} for every 'auto' above in `config`, one line per choice); `config` is left
  as it is (resolve.py applies the choices)."""
  d, m = config.data, config.model
  changes, notes = {}, []
  kind = f"{platform()} ({jax.devices()[0].device_kind})"
  dtype = m.dtype
  if dtype == AUTO:
    dtype = changes["model.dtype"] = compute_dtype(AUTO)
    notes.append(f"model.dtype=auto -> {dtype} on {kind}")
  if m.attention_impl == AUTO:
    impl, why = attention_impl(AUTO, dtype, head_dims(config))
    changes["model.attention_impl"] = impl
    notes.append(f"model.attention_impl=auto -> {impl} ({why})")
  if AUTO in (d.num_workers, d.prefetch_threads):
    was = (d.num_workers, d.prefetch_threads)
    workers, threads = data_workers(*was)
    changes.update({"data.num_workers": workers, "data.prefetch_threads": threads})
    notes.append(f"data.num_workers={was[0]}, data.prefetch_threads={was[1]} -> "
                 f"{workers} worker processes x {threads} threads for {host_cores()} cores")
  return changes, notes
