"""Train-step memory per device, and the largest batch that fits, from XLA's memory analysis of
the compiled step: nothing is allocated, so it answers for any device memory on any machine
(the analysis is the target platform's own: a CPU's numbers are estimates for a GPU's).

`data.batch_size='auto'` uses `largest_batch` at start-up on the actual devices; the
`model_summary` tool reports it for a given device memory.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import config as config_lib
from linnaeus_jax import optim, schedules, sharding, train_step
from linnaeus_jax import state as state_lib

GIB = 2**30


def step_bytes(compiled) -> int:
  """Bytes a compiled step needs per device: arguments, outputs not aliased to them (donated
  state), temporaries and code (0 where the backend gives no analysis)."""
  ma = compiled.memory_analysis()
  if ma is None:
    return 0
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)


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
  """Raises ValueError if `compiled` needs more memory per device than a device has, before
  anything is allocated; returns the bytes it needs."""
  need = step_bytes(compiled)
  have, where = device_memory(jax.local_devices()[0])
  if have is not None and need > have:
    ma = compiled.memory_analysis()
    gib = lambda n: f"{n / GIB:,.2f} GiB"
    raise ValueError(
        f"{what} needs {gib(need)} per device (state and batch {gib(ma.argument_size_in_bytes)}, "
        f"temporaries {gib(ma.temp_size_in_bytes)}) but {where} has {gib(have)}: lower "
        "data.batch_size (or set it to 'auto'; train.accumulation_steps keeps the batch in "
        "micro-batches), data.img_size or the model size, or shard the state with mesh.fsdp")
  return need


def record_spec(config) -> dict:
  """One training record's shapes and dtypes, from the config alone (`pipeline.padding_record`
  gives the same from the data)."""
  s, comps = config.data.img_size, config_lib.enabled_components(config)
  f = lambda shape, dtype: np.zeros(shape, dtype)
  return {"image": f((s, s, 3), np.uint8),
          "labels": {t: np.int32(0) for t in config.data.task_keys_h5},
          "meta": {name: f((c.dim,), np.float32) for name, c in comps},
          "meta_valid": f((len(comps),), bool), "group_id": np.int32(-1),
          "pair_ok": np.bool_(False), "example_mask": np.bool_(False)}


def _constant_specs(config) -> dict:
  """Stand-ins for `state.loss_constants` without data: the taxonomy smoothing matrices the
  losses read (the metrics' constants are optional and small)."""
  heads = config.model.classification.heads
  return {"tax": {t: jax.ShapeDtypeStruct((heads[t].num_classes,) * 2, jnp.float32)
                  for t in config.data.task_keys_h5}}


def compile_train_step(config, batch_size: int, mesh, consts=None, record=None, parents=None):
  """The train step of `config` at `batch_size`, compiled for `mesh` from abstract values (as
  `train.run` compiles it), and its compile seconds."""
  c = config_lib.with_changes(config, {"data.batch_size": int(batch_size)})
  tx, lrs = optim.build(c, 1000, 100)
  graphdef, init = state_lib.create_state(c, parents)
  abstract, state_sharding = state_lib.abstract_state(init, tx, mesh, c)
  batch_sharding, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      (c.data.batch_size,) + np.shape(x), np.asarray(x).dtype, sharding=batch_sharding),
                      record if record is not None else record_spec(c))
  step = train_step.make_train_step(graphdef, tx, train_step.StepConfig.from_config(c), lrs,
                                    schedules.Schedules.from_config(c, 1000, 100))
  t0 = time.time()
  compiled = jax.jit(step, in_shardings=(state_sharding, batch_sharding, repl),
                     out_shardings=(state_sharding, repl), donate_argnums=(0,)).lower(
                         abstract, spec, _constant_specs(c) if consts is None else consts
                     ).compile()
  return compiled, time.time() - t0


def batch_multiple(config, num_devices: int) -> int:
  """Batches must split into accumulation micro-batches of whole pairs on every device."""
  return 2 * num_devices * config.train.accumulation_steps


def search(need, multiple: int, budget: int, max_batch: int = 16384, checks: int = 4) -> dict:
  """The largest multiple of `multiple` (up to `max_batch`) with need(batch) <= budget, in few
  calls of `need` (each a compilation): the line through one and four multiples predicts it
  (exact where memory is affine in the batch); a prediction over the budget brackets the answer,
  which `checks` more calls narrow by interpolation. Returns {batch, bytes, fixed_bytes,
  bytes_per_sample}; ValueError if not even one multiple fits."""
  b1, b2 = multiple, 4 * multiple
  if need(b1) > budget:
    raise ValueError(f"even batch {b1} needs {need(b1) / GIB:,.2f} GiB per device, over the "
                     f"{budget / GIB:,.2f} GiB budget")
  per = max((need(b2) - need(b1)) / (b2 - b1), 1.0)
  fits = need(b2) <= budget
  lo, hi = (b2, None) if fits else (b1, b2)  # largest known to fit, smallest known not to
  guess = lo + (budget - need(lo)) / per
  for _ in range(checks):
    guess = min(int(guess), max_batch, (hi or max_batch + multiple) - multiple)
    guess = guess // multiple * multiple
    if guess <= lo:
      break
    if need(guess) <= budget:
      lo = guess
      if hi is None:
        break  # the line's prediction fits: nothing known above it
    else:
      hi = guess
    guess = lo + (budget - need(lo)) * (hi - lo) / (need(hi) - need(lo))
  return {"batch": lo, "bytes": need(lo), "fixed_bytes": int(need(b1) - per * b1),
          "bytes_per_sample": int(per)}


def largest_batch(config, mesh, device_bytes: int, headroom: float = 0.0, consts=None,
                  record=None, parents=None, log=None, cache: dict | None = None,
                  checks: int = 4) -> dict:
  """`search` over compilations of the train step (`batch_multiple`s) for the largest batch that
  needs at most (1 - headroom) x `device_bytes` per device; adds {budget, compiles}. `cache`
  ({batch: bytes}) carries compilations over to another call for the same config."""
  budget = int(device_bytes * (1.0 - headroom))
  seen = {} if cache is None else cache

  def need(b):
    if b not in seen:
      compiled, secs = compile_train_step(config, b, mesh, consts, record, parents)
      seen[b] = step_bytes(compiled)
      if log:
        log(f"  batch {b}: {seen[b] / GIB:,.2f} GiB per device (compiled in {secs:.0f} s)")
    return seen[b]

  try:
    r = search(need, batch_multiple(config, mesh.size), budget, checks=checks)
  except ValueError as e:
    raise ValueError(f"data.batch_size=auto: {e} ({headroom:.0%} headroom): use a smaller model "
                     "or image size, or shard the state with mesh.fsdp") from None
  return {**r, "budget": budget, "compiles": len(seen)}


def auto_batch(config, mesh, consts, record, parents) -> tuple[int, list[str]]:
  """(the largest batch that fits this run's devices, the line to print and record), for
  data.batch_size='auto'."""
  have, where = device_memory(jax.local_devices()[0])
  if have is None:
    raise ValueError("data.batch_size=auto: the devices' memory is unknown here; set a batch")
  h = config.data.batch_size_headroom
  lines = []
  r = largest_batch(config, mesh, have, h, consts, record, parents, log=lines.append)
  for line in lines:
    if jax.process_index() == 0:
      print(line, flush=True)
  return r["batch"], [
      f"data.batch_size=auto -> {r['batch']}: {r['bytes'] / GIB:,.2f} GiB of {where}'s "
      f"{have / GIB:,.2f} GiB per device ({h:.0%} headroom; {r['fixed_bytes'] / GIB:,.2f} "
      f"GiB + {r['bytes_per_sample'] / 2**20:,.1f} MiB per sample; {r['compiles']} "
      "compilations)"]
