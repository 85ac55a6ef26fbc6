"""Ours vs the PyTorch original, side by side in one run on this machine: mFormerV1 sm.

    python benchmarks/compare_original.py --original=/path/to/linnaeus \
        [--torch_python=/path/to/python-with-torch] [--batches=8,32] [--img_size=224] \
        [--steps=2] [--repeats=3] [--threads=0] [--scan_blocks=true|false] [--depthwise_impl=...]

Per batch size two rows, "train" and "forward": milliseconds per call, the fastest of `repeats`
rounds of `steps` calls. The rounds alternate between the two sides (ours train, original train,
ours forward, original forward, then again), so that a change of load on the machine hits both.

- train, ours: the jitted train step of `benchmarks/train_step.py`'s `bench()` (forward,
  backward, gradient clipping at 5, AdamW update; float32; metadata masking and mixing off;
  plain cross-entropy on the 4 heads 684/179/40/4 summed with static weights 1;
  `meta_missing='zeros'`, the original's). Original: eager PyTorch float32, `model.train()`, the
  same summed cross-entropy, backward, `clip_grad_norm_(5.0)` and `torch.optim.AdamW` (lr 1e-4,
  weight decay 0.05).
- forward, ours: the exported forward (`inference/export.py`'s `export_forward`, CPU only: what a
  bundle runs, uint8 images normalised inside), jitted at the batch size. Original: `model.eval()`
  under `torch.no_grad()` on float32 NCHW images.

The original (a checkout of polli-labs/linnaeus, imported from `--original`, never copied here)
is built in a subprocess run by `--torch_python` (default: this Python) with the config of
`tests/make_torch_reference.py` (mFormerV1_sm.yaml, plain attention, Linear heads) and metadata
TEMPORAL 2 / SPATIAL 3 / ELEVATION 10; it answers each timing request with a JSON line, so our venv
needs no torch. Both sides use the same cores: all of them (`--threads=0`; torch gets one thread
per core, XLA's CPU client uses them all), or the first N (`--threads=N`: both processes pinned
to them). On a machine shared with other work, torch's OpenMP threads wait at every operator for
a descheduled peer (up to 30x slower at small sizes here): compare with `--threads=1` there.
Without torch or the checkout, a "skipped: ..." line says why and only ours is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40")
CLASSES = (684, 179, 40, 4)  # the parity heads (benchmarks/train_step.py)
META = (("TEMPORAL", 2, 0), ("SPATIAL", 3, 1), ("ELEVATION", 10, 2))  # (name, dim, index)
WHAT = ("train", "forward")


# --------------------------------------------------------------------------- the original (torch)

def torch_worker(spec: dict):
  """Runs in the torch Python: builds the original at one batch size, then times rounds on request
  (one JSON line in, one out) until stdin closes."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(spec["original"]))
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  os.environ["CONFIG_DIR"] = os.path.abspath(spec["original"])  # MODEL.BASE paths resolve here
  import make_torch_reference as ref  # pylint: disable=g-import-not-at-top
  from linnaeus.config import get_default_config  # pylint: disable=g-import-not-at-top
  from linnaeus.models import build_model  # pylint: disable=g-import-not-at-top
  from linnaeus.utils.config_utils import load_model_base_config  # pylint: disable=g-import-not-at-top
  ref.get_default_config, ref.load_model_base_config = get_default_config, load_model_base_config
  ref.TASKS, ref.META = list(TASKS), list(META)

  threads = len(os.sched_getaffinity(0))  # the parent's choice (--threads), inherited
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  # On an accelerator (benchmarks/accelerator.py): device 'cuda', AMP bf16, torch.compile.
  device = torch.device(spec.get("device", "cpu"))
  amp = getattr(torch, spec["amp"]) if spec.get("amp") else None
  model = build_model(ref.make_config(spec["img_size"]), num_classes=dict(zip(TASKS, CLASSES)),
                      taxonomy_tree=None).float().to(device)
  b, s = spec["batch"], spec["img_size"]
  g = torch.Generator().manual_seed(0)
  images = torch.randn(b, 3, s, s, generator=g).to(device)
  meta = torch.randn(b, sum(d for _, d, _ in META), generator=g).to(device)
  labels = [torch.randint(0, n, (b,), generator=g).to(device) for n in CLASSES]
  run = torch.compile(model) if spec.get("compile") else model
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999),
                          eps=1e-8)

  def train():
    model.train()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
      out = run(images, meta)
      loss = sum(torch.nn.functional.cross_entropy(out[t].float(), y)
                 for t, y in zip(TASKS, labels))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()

  def forward():
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
      run(images, meta)

  calls = {"train": train, "forward": forward}
  print(json.dumps({"ready": True, "threads": threads, "torch": torch.__version__,
                    "params": int(sum(p.numel() for p in model.parameters()))}), flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    fn = calls[req["what"]]
    for _ in range(req.get("warmup", 0)):
      fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(req["steps"]):
      fn()
    sync()
    print(json.dumps({"ms": 1000 * (time.perf_counter() - t0) / req["steps"]}), flush=True)


class Original:
  """The torch worker of one batch size, or why there is none (`skipped`)."""

  def __init__(self, a, batch: int):
    self.proc, self.skipped, self.info = None, None, {}
    marker = os.path.join(a.original or "", "linnaeus", "models", "mFormerV1.py")
    if not a.original or not os.path.isfile(marker):
      self.skipped = (f"no checkout of polli-labs/linnaeus at --original={a.original!r} "
                      f"({marker} missing)")
      return
    probe = subprocess.run([a.torch_python, "-c", "import torch, yacs"], capture_output=True,
                           text=True, check=False)
    if probe.returncode:
      last = (probe.stderr.strip().splitlines() or ["?"])[-1]
      self.skipped = f"{a.torch_python} cannot import torch and yacs ({last})"
      return
    spec = dict(original=a.original, batch=batch, img_size=a.img_size,
                device=getattr(a, "device", "cpu"), amp=getattr(a, "amp", ""),
                compile=getattr(a, "compile", False))
    self.stderr = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen([a.torch_python, os.path.abspath(__file__), "--torch_worker",
                                  json.dumps(spec)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.stderr, text=True)
    self.info = self._answer() or {}

  def _answer(self):
    """The worker's next JSON line, or None (and `skipped` set) when it died."""
    for line in self.proc.stdout:
      if line.startswith("{"):
        return json.loads(line)
    self.proc.wait()
    self.stderr.seek(0)
    tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])
    self.skipped = f"the original's run failed (exit {self.proc.returncode}): {tail}"
    self.proc = None
    return None

  def round(self, what: str, steps: int, warmup: int = 0):
    if self.proc is None:
      return None
    self.proc.stdin.write(json.dumps({"what": what, "steps": steps, "warmup": warmup}) + "\n")
    self.proc.stdin.flush()
    out = self._answer()
    return out and out["ms"]

  def close(self):
    if self.proc is not None:
      self.proc.stdin.close()
      self.proc.wait()


# --------------------------------------------------------------------------- ours (jax)

def our_config(a, batch: int):
  """configs/sm.py at `img_size` and `batch`, float32, the original's metadata and heads,
  meta_missing 'zeros', masking and mixing off, plain cross-entropy (train_step.set_masking)."""
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import train_step as bench_lib  # pylint: disable=g-import-not-at-top
  c = bench_lib.load(os.path.join(ROOT, "configs", "sm.py"))
  c.data.img_size, c.data.batch_size = a.img_size, batch
  c.data.task_keys_h5 = list(TASKS)
  for name, dim, idx in META:
    comp = c.data.meta.components[name]
    comp.enabled, comp.dim, comp.idx = True, dim, idx
  c.model.dtype = "float32"
  c.model.meta_missing = "zeros"
  if a.scan_blocks:
    c.model.scan_blocks = a.scan_blocks.lower() in ("1", "true", "yes")
  if a.depthwise_impl:
    c.model.depthwise_impl = a.depthwise_impl
  bench_lib.set_masking(c, False)
  for t, n in zip(TASKS, CLASSES):
    c.model.classification.heads[t].num_classes = n
  return c


class Ours:
  """Our compiled train step (built as train_step.bench() builds it) and exported forward."""

  def __init__(self, a, batch: int):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from linnaeus_jax import config as config_lib, models  # pylint: disable=g-import-not-at-top
    from linnaeus_jax import optim, schedules, sharding, train_step  # pylint: disable=g-import-not-at-top
    from linnaeus_jax import state as state_lib  # pylint: disable=g-import-not-at-top
    from linnaeus_jax.inference import bundle, export  # pylint: disable=g-import-not-at-top

    self.jax = jax
    c = our_config(a, batch)
    comps = config_lib.enabled_components(c)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, a.img_size, a.img_size, 3), dtype=np.uint8)
    meta = {n: rng.normal(size=(batch, comp.dim)).astype(np.float32) for n, comp in comps}
    valid = np.ones((batch, len(comps)), bool)

    # The train step, as benchmarks/train_step.py's bench() builds and calls it.
    mesh = sharding.make_mesh(c)
    tx, lr = optim.build(c, 1000, 100)
    graphdef, init = state_lib.create_state(c)
    self.state = jax.jit(lambda: init(tx))()
    step = train_step.make_train_step(graphdef, tx, train_step.StepConfig.from_config(c), lr,
                                      schedules.Schedules.from_config(c, 1000, 100))
    self.batch = sharding.global_batch({
        "image": images, "meta": meta, "meta_valid": valid,
        "labels": {t: rng.integers(0, n, batch).astype(np.int32) for t, n in zip(TASKS, CLASSES)},
        "example_mask": np.ones(batch, bool), "pair_ok": np.ones(batch, bool)}, mesh)
    t0 = time.time()
    self.step = jax.jit(step, donate_argnums=(0,)).lower(self.state, self.batch, {}).compile()
    self.compile_s = {"train": time.time() - t0}

    # The exported forward, as a bundle runs it.
    _, params, buffers = nnx.split(models.build(c, nnx.Rngs(0)), nnx.Param, ...)
    variables = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
    record = {"image": {"size": a.img_size, "mean": [0.485, 0.456, 0.406],
                        "std": [0.229, 0.224, 0.225]},
              "metadata": [{"name": n, "dim": comp.dim} for n, comp in comps]}
    t0 = time.time()
    exported = export.export_forward(c, variables, record, platforms=("cpu",))
    self.forward_args = (jax.device_put(bundle.flatten(variables)), images, meta, valid)
    self.forward = jax.jit(exported.call).lower(*self.forward_args).compile()
    self.compile_s["forward"] = time.time() - t0
    self.info = {"jax": jax.__version__, "cores": len(os.sched_getaffinity(0)),
                 "scan_blocks": c.model.scan_blocks, "depthwise_impl": c.model.depthwise_impl,
                 "params": int(sum(x.size for x in jax.tree.leaves(variables["params"])))}

  def _call(self, what):
    if what == "train":
      self.state, out = self.step(self.state, self.batch, {})
      return out["loss"]
    return self.forward(*self.forward_args)

  def round(self, what: str, steps: int, warmup: int = 0):
    for _ in range(warmup):
      self.jax.block_until_ready(self._call(what))
    t0 = time.perf_counter()
    for _ in range(steps):
      out = self._call(what)
    self.jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - t0) / steps


# --------------------------------------------------------------------------- table

def main():
  if len(sys.argv) == 3 and sys.argv[1] == "--torch_worker":
    torch_worker(json.loads(sys.argv[2]))
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--original", default="", help="checkout of polli-labs/linnaeus")
  p.add_argument("--torch_python", default=sys.executable, help="a Python with torch and yacs")
  p.add_argument("--batches", default="8,32")
  p.add_argument("--img_size", type=int, default=224)
  p.add_argument("--steps", type=int, default=2, help="calls per timed round")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per side; the fastest counts")
  p.add_argument("--threads", type=int, default=0,
                 help="cores for both sides (this process and the torch worker are pinned to the "
                      "first N; torch gets N threads, XLA sizes its pools by them); 0: all")
  p.add_argument("--scan_blocks", default="", help="ours: model.scan_blocks (true|false)")
  p.add_argument("--depthwise_impl", default="", help="ours: model.depthwise_impl")
  a = p.parse_args()
  if a.threads:  # before jax is imported: XLA's CPU client sizes its thread pools by the affinity
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:a.threads])

  rows, info, skipped = [], {}, None
  for batch in [int(x) for x in a.batches.split(",")]:
    theirs = Original(a, batch)  # builds while nothing else runs
    ours = Ours(a, batch)
    info["ours"] = ours.info
    if theirs.info:
      info["original"] = theirs.info
    times = {(side, what): [] for side in ("ours", "original") for what in WHAT}
    for r in range(a.repeats):
      for what in WHAT:
        warm = 1 if r == 0 else 0
        times[("ours", what)].append(ours.round(what, a.steps, warm))
        ms = theirs.round(what, a.steps, warm)
        if ms is not None:
          times[("original", what)].append(ms)
      print(f"# batch {batch} round {r + 1}: " + ", ".join(
          f"{side} {what} {v[-1]:,.0f} ms" for (side, what), v in times.items() if v),
            file=sys.stderr, flush=True)
    theirs.close()
    skipped = skipped or theirs.skipped
    for what in WHAT:
      rows.append((batch, what, times[("ours", what)], times[("original", what)]))

  if skipped:
    print(f"skipped: {skipped}")
  for k, v in info.items():
    print(f"{k}: " + ", ".join(f"{n}={x}" for n, x in v.items()))
  fmt = lambda v: f"{min(v):,.1f}" if v else "n/a"
  print(f"\n| config | batch | what | ours ms | original ms | ratio ours/original |")
  print("|---|---|---|---|---|---|")
  for batch, what, o, t in rows:
    ratio = f"{min(o) / min(t):.2f}" if o and t else "n/a"
    print(f"| sm@{a.img_size} | {batch} | {what} | {fmt(o)} | {fmt(t)} | {ratio} |")
  print(f"\nAll rounds (ms per call, {a.steps} calls each):")
  for batch, what, o, t in rows:
    print(f"  batch {batch} {what}: ours {[round(x) for x in o]}, "
          f"original {[round(x) for x in t] or 'n/a'}")


if __name__ == "__main__":
  main()
