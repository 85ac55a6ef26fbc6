"""Everything we measure on an accelerator, in one run that fits a short lease of the machine.

    bash benchmarks/accelerator.sh [--dry_run] [--out=DIR] [--original=PATH] [--budget_s=450]

Sections, in order of importance (each is skipped, with the reason, once the time budget would
not cover it; results are rewritten after every section, so a run cut short keeps what it did):

1. env: devices, driver, versions, and the measured dense bf16 matmul peak (the MFU reference).
2. train: mFormerV1 sm at 384 in bfloat16, batch 64 and 128: compile s, step ms, img/s,
   TFLOP/s (3 x XLA's forward FLOPs) and MFU against the measured peak.
3. original: the PyTorch original's mFormerV1_sm train step on the same device, AMP bf16, eager
   and `torch.compile`, batch 64 (`compare_original.py`'s worker; needs torch and `--original`):
   ours / original is the headline.
4. pipeline: the Grain input pipeline at 384 with the host's cores ('auto' workers), from a JPEG
   folder and from packed shards, against the train step's img/s.
5. inference: the exported forward (what a bundle runs), img/s at batch 1, 64, 256.
6. variants at batch 64: attention xla vs cudnn, depthwise shift vs conv, scan off, remat dots.
7. largest: the largest batch that fits the device (memory analysis, 10% headroom), timed.
8. sizes: md and lg at batch 64.

`--dry_run`: the same code on this machine with tiny sizes (demo model at 64 px), in minutes.
Writes accelerator.json and accelerator.md to --out (default $OUT, else benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

if "--dry_run" in sys.argv:  # compile time is what a dry run spends: skip XLA's optimizations
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compare_original  # noqa: E402
import train_step as bench_lib  # noqa: E402
from linnaeus_jax import config as config_lib, hardware, memory  # noqa: E402
from linnaeus_jax.tools import model_summary  # noqa: E402

FULL = dict(config="sm", img=384, batches=(64, 128), variant_batch=64, sizes=("md", "lg"),
            pipeline_rows=1536, infer_batches=(1, 64, 256), steps=10, repeats=3, peak_n=8192)
# The dry run: a tiny model (the tests' size) at 32 px, every section and variant once.
TINY = {"convnext_stages.dims": (16, 24, 32, 48), "convnext_stages.depths": (1, 1),
        "rope_stages.dims": (32, 48), "rope_stages.depths": (1, 1),
        "rope_stages.num_heads": (2, 2)}
DRY = dict(config="demo", img=32, batches=(4,), variant_batch=4, sizes=(), pipeline_rows=96,
           infer_batches=(1, 4), steps=2, repeats=1, peak_n=512, model=TINY,
           variants=("attention cudnn",), largest_checks=0, dry=True)  # FLOPs not counted


class Run:
  """Sections against a deadline; results written after each."""

  def __init__(self, out: str, budget_s: float):
    self.out, self.t0, self.budget = out, time.time(), budget_s
    self.results = {"sections": {}, "skipped": {}, "errors": {}}
    os.makedirs(out, exist_ok=True)

  def left(self) -> float:
    return self.budget - (time.time() - self.t0)

  def section(self, name: str, need_s: float, fn, *args):
    if self.left() < need_s:
      self.results["skipped"][name] = f"{self.left():.0f} s left, about {need_s:.0f} s needed"
      print(f"[{name}] skipped: {self.results['skipped'][name]}", flush=True)
      return None
    t = time.time()
    print(f"[{name}] ...", flush=True)
    try:
      r = fn(*args)
      self.results["sections"][name] = r
    except Exception as e:  # pylint: disable=broad-except  (report it, go on with the rest)
      r = None
      self.results["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      traceback.print_exc()
    print(f"[{name}] {time.time() - t:.0f} s", flush=True)
    self.write()
    return r

  def write(self):
    self.results["wall_s"] = round(time.time() - self.t0, 1)
    with open(os.path.join(self.out, "accelerator.json"), "w") as f:
      json.dump(self.results, f, indent=1, default=str)
    with open(os.path.join(self.out, "accelerator.md"), "w") as f:
      f.write(markdown(self.results))


# ----------------------------------------------------------------------------- sections


def env(p) -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "h5py",
               "pillow", "torch", "timm"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      versions[name] = None
  dev = jax.devices()[0]
  smi = ""
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=20).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    pass
  n = p["peak_n"]  # dense bf16 matmul, the MFU reference
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(mm(a))
    times.append(time.perf_counter() - t)
  have, where = memory.device_memory(dev)
  return {"device": f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
          "nvidia_smi": smi, "host_cores": hardware.host_cores(),
          "device_memory_gib": round(have / memory.GIB, 1) if have else None,
          "memory_source": where, "versions": versions,
          "peak_bf16_tflops": round(2 * n**3 / min(times) / 1e12, 1)}


def _config(p, name=None, batch=None, **model):
  c = bench_lib.load(name or p["config"])
  c.data.img_size = c.data.synthetic.options.img_size = p["img"]
  c.data.batch_size = batch or p["batches"][0]
  c.model.dtype = "bfloat16"
  for k, v in {**p.get("model", {}), **model}.items():
    node, key = (c.model, k) if "." not in k else (c.model[k.split(".")[0]], k.split(".")[1])
    node[key] = v
  bench_lib.set_masking(c, True)  # the step as it trains: masking and mixing on
  for t, n in zip(c.data.task_keys_h5, bench_lib.CLASSES):
    c.model.classification.heads[t].num_classes = n
  return c


_FORWARD = {}  # (config, img) -> its model_summary: FLOPs do not depend on the variants


def _time(p, c, peak, name=None) -> dict:
  key = (name or p["config"], c.data.img_size)
  if key not in _FORWARD:  # two compilations of the forward: not worth it in a dry run
    _FORWARD[key] = ({"gflops_forward": 0.0, "params_total": 0} if p.get("dry")
                     else model_summary.summary(c))
  r = bench_lib.bench(c, p["steps"], p["repeats"], forward=_FORWARD[key])
  impl, _ = hardware.attention_impl(c.model.attention_impl, c.model.dtype,
                                    hardware.head_dims(c))
  r.update(attention=impl, mfu=round(100 * r["tflop_s"] / peak, 1) if peak else None)
  return {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}


def train(p, peak) -> list:
  return [_time(p, _config(p, batch=b), peak) for b in p["batches"]]


def original(p, a) -> dict:
  """The original's train step at our batch: AMP bf16 on a GPU (eager, then torch.compile),
  float32 elsewhere; `compare_original.py`'s torch worker."""
  gpu = jax.default_backend() == "gpu"
  ns = argparse.Namespace(original=a.original, torch_python=a.torch_python, img_size=p["img"],
                          device="cuda" if gpu else "cpu", amp="bfloat16" if gpu else "",
                          compile=False)
  out = {}
  for mode in ("eager", "compile") if gpu else ("eager",):
    ns.compile = mode == "compile"
    o = compare_original.Original(ns, p["variant_batch"])
    if o.skipped:
      out[mode] = {"skipped": o.skipped}
      continue
    try:
      rounds = [o.round("train", p["steps"], warmup=2 if r == 0 else 0)
                for r in range(p["repeats"])]
    finally:
      o.close()
    ms = min(r for r in rounds if r is not None) if any(rounds) else None
    out[mode] = {**o.info, "batch": p["variant_batch"], "step_ms": ms,
                 "img_s": round(1000 * p["variant_batch"] / ms, 1) if ms else None,
                 **({"skipped": o.skipped} if o.skipped else {})}
  return out


def pipeline_speed(p, step_img_s) -> dict:
  from linnaeus_jax.data import labels, pipeline, synthetic  # pylint: disable=g-import-not-at-top
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    per = max(1, p["pipeline_rows"] // 48)
    opts = synthetic.SyntheticOptions(img_size=p["img"], max_samples_per_species=per,
                                      min_samples_per_species=per)
    t = time.time()
    paths = synthetic.generate(os.path.join(tmp, "jpeg"), opts, verbose=False)
    out["generate_s"] = round(time.time() - t, 1)
    import data_pipeline  # pylint: disable=g-import-not-at-top
    sources = {"jpeg folder": None,
               "shards": data_pipeline.pack_folder(paths, os.path.join(tmp, "shards"), 512)}
    batch = p["batches"][0]
    for name, shard_glob in sources.items():
      c = config_lib.base_config()
      c.data.h5.labels_path = paths["labels_path"]
      if shard_glob:
        c.data.h5.images_path = shard_glob
      else:
        c.data.hybrid.use_hybrid, c.data.hybrid.images_dir = True, paths["images_dir"]
      c.data.img_size, c.data.batch_size = p["img"], batch
      c.data.partial.levels = True
      c.data.meta.components.ELEVATION.enabled = True
      c = config_lib.with_changes(c, hardware.choices(c)[0])  # the 'auto' workers and threads
      data = labels.load(c)
      n = max(2, len(data.train) // batch)
      it = iter(pipeline.train_dataset(data, c, n + 3))
      t = time.time()
      for _ in range(3):  # worker start-up
        next(it)
      start_s = time.time() - t
      t = time.time()
      for _ in range(n):
        next(it)
      ips = n * batch / (time.time() - t)
      out[name] = {"img_s": round(ips, 1), "workers": c.data.num_workers,
                   "threads": c.data.prefetch_threads, "startup_s": round(start_s, 1),
                   "keeps_up": bool(step_img_s and ips >= step_img_s)}
  out["train_step_img_s"] = step_img_s
  return out


def inference(p) -> list:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import models  # pylint: disable=g-import-not-at-top
  from linnaeus_jax.inference import bundle, export  # pylint: disable=g-import-not-at-top
  c = _config(p)
  _, params, buffers = nnx.split(models.build(c, nnx.Rngs(0)), nnx.Param, ...)
  variables = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
  comps = config_lib.enabled_components(c)
  record = {"image": {"size": p["img"], "mean": None, "std": None},
            "metadata": [{"name": n, "dim": comp.dim} for n, comp in comps]}
  exp = jax.export.deserialize(export.export_forward(
      c, variables, record, platforms=(jax.default_backend().replace("gpu", "cuda"),)
  ).serialize())
  flat = jax.device_put(bundle.flatten(variables))
  call, rows, rng = jax.jit(exp.call), [], np.random.default_rng(0)
  for b in p["infer_batches"]:
    args = (flat, rng.integers(0, 256, (b, p["img"], p["img"], 3), dtype=np.uint8),
            {n: rng.normal(size=(b, comp.dim)).astype(np.float32) for n, comp in comps},
            np.ones((b, len(comps)), bool))
    jax.block_until_ready(call(*args))
    times = []
    for _ in range(max(3, p["repeats"])):
      t = time.perf_counter()
      jax.block_until_ready(call(*args))
      times.append(time.perf_counter() - t)
    rows.append({"batch": b, "ms": round(1000 * min(times), 2),
                 "img_s": round(b / min(times), 1)})
  return rows


VARIANTS = {"attention xla": dict(attention_impl="xla"),
            "attention cudnn": dict(attention_impl="cudnn"),
            "depthwise conv": dict(depthwise_impl="conv"), "scan off": dict(scan_blocks=False),
            "remat dots": dict(remat="dots")}


def variants(p, peak) -> list:
  b, rows = p["variant_batch"], []
  for name in p.get("variants", VARIANTS):
    model = VARIANTS[name]
    try:
      r = _time(p, _config(p, batch=b, **model), peak)
    except Exception as e:  # pylint: disable=broad-except  (e.g. cuDNN missing: say so)
      r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    rows.append({"variant": name, **r})
  return rows


def largest(p, peak, gib) -> dict:
  c = _config(p)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  have = int(gib * memory.GIB) if gib else memory.device_memory(jax.devices()[0])[0]
  r = memory.largest_batch(c, mesh, have, 0.1, log=print, checks=p.get("largest_checks", 4))
  c.data.batch_size = r["batch"]
  return {"search": r, "timed": _time(p, c, peak) if not p.get("dry") else None}


def sizes(p, peak) -> list:
  return [{"size": s, **_time(p, _config(p, name=s, batch=p["variant_batch"]), peak, s)}
          for s in p["sizes"]]


# ----------------------------------------------------------------------------- report


def _table(rows, cols) -> str:
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)


def markdown(res) -> str:
  s, out = res["sections"], [f"# Accelerator run ({res.get('mode')}, {res.get('wall_s')} s)\n"]
  if "env" in s:
    e = s["env"]
    out.append(f"{e['device']}; {e['nvidia_smi']}; {e['host_cores']} host cores; "
               f"{e['device_memory_gib']} GiB ({e['memory_source']}); measured bf16 matmul "
               f"peak {e['peak_bf16_tflops']} TFLOP/s\n\nversions: " + ", ".join(
                   f"{k} {v}" for k, v in e["versions"].items() if v) + "\n")
  step_cols = ["batch", "dtype", "attention", "scan", "remat", "dw", "compile_s", "step_ms",
               "img_s", "tflop_s", "mfu"]
  if "train" in s:
    out.append("## Train step\n\n" + _table(s["train"], step_cols) + "\n")
  if "original" in s:
    o = s["original"]
    out.append("## The PyTorch original, same batch\n\n```\n" + json.dumps(o, indent=1) +
               "\n```\n")
  if "pipeline" in s:
    out.append("## Input pipeline\n\n```\n" + json.dumps(s["pipeline"], indent=1) + "\n```\n")
  if "inference" in s:
    out.append("## Exported forward\n\n" + _table(s["inference"], ["batch", "ms", "img_s"]) + "\n")
  if "variants" in s:
    out.append("## Variants\n\n" + _table(s["variants"], ["variant", "error"] + step_cols) + "\n")
  if "largest" in s:
    timed = [s["largest"]["timed"]] if s["largest"]["timed"] else []
    out.append("## Largest batch\n\n```\n" + json.dumps(s["largest"]["search"]) + "\n```\n\n" +
               _table(timed, step_cols) + "\n")
  if "sizes" in s:
    out.append("## Sizes\n\n" + _table(s["sizes"], ["size"] + step_cols) + "\n")
  for kind in ("skipped", "errors"):
    for k, v in res[kind].items():
      out.append(f"- {kind[:-1] if kind == 'errors' else kind}: {k}: {v}")
  return "\n".join(out) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dry_run", action="store_true", help="tiny sizes, on any machine")
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks",
                                                                        "out"))
  ap.add_argument("--original", default=os.path.join(ROOT, ".orig", "linnaeus"),
                  help="checkout of polli-labs/linnaeus (benchmarks/prepare_accelerator.sh)")
  ap.add_argument("--torch_python", default=sys.executable)
  ap.add_argument("--budget_s", type=float, default=450.0,
                  help="start no section that would end after this (dry runs: no limit)")
  ap.add_argument("--device_gib", type=float, default=0.0,
                  help="device memory for `largest` (0: the device's; dry runs use 0.25)")
  a = ap.parse_args()
  p = DRY if a.dry_run else FULL
  run = Run(a.out, 1e9 if a.dry_run else a.budget_s)
  run.results["mode"] = "dry run" if a.dry_run else "full"
  e = run.section("env", 5, env, p)
  peak = e["peak_bf16_tflops"] if e and jax.default_backend() != "cpu" else None
  t = run.section("train", 60, train, p, peak)
  run.section("original", 60, original, p, a)
  step_img_s = t[0]["img_s"] if t else None
  run.section("pipeline", 60, pipeline_speed, p, step_img_s)
  run.section("inference", 40, inference, p)
  run.section("variants", 120, variants, p, peak)
  run.section("largest", 90, largest, p, peak, a.device_gib or (0.25 if a.dry_run else 0))
  if p["sizes"]:
    run.section("sizes", 60, sizes, p, peak)
  run.write()
  print(markdown(run.results))
  sys.exit(1 if run.results["errors"] else 0)


if __name__ == "__main__":
  main()
