"""Experiments with error bars: each variant of a suite trained with several seeds, the final
validation of every run tabulated as mean +- std over the seeds (docs/experiments.md).

    python benchmarks/experiments.py --suite=metadata [--seeds=3] [--steps=0]
        [--config=configs/demo_hard.py] [--runs=runs/experiments] [--out=docs/experiments]

Runs go one after another into RUNS/<key>/seed_<k> (`python -m linnaeus_jax.main
--config.misc.seed=k` plus the variant's overrides), the key a hash of the config file, the
overrides and the steps (RUNS/<key>/variant.json says which): a variant the same as another
suite's (each suite's baseline is the config as it is) shares its runs. A run whose final
validation report (eval/step_<N>.json) exists is not run again, and an interrupted one resumes
from its last checkpoint, so rerunning a suite only does what is missing. Every variant's config
is checked before anything trains. OUT/<suite>.md gets the table (and the command, machine, seeds
and wall time), OUT/<suite>.json the numbers of every run, OUT/<suite>.png the suite's headline
metric per variant with its spread.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("TEMPORAL", "SPATIAL", "ELEVATION")
TASKS = ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40")


def _heads(kind: str, *extra: str) -> list[str]:
  return [f"--config.model.classification.heads.{t}.{k}" for t in TASKS
          for k in (f"type={kind}", *extra)]


_PARTIAL = ["--config.schedule.meta_masking.partial.enabled=true",
            "--config.schedule.meta_masking.partial.whitelist="
            "(('TEMPORAL',),('SPATIAL',),('ELEVATION',))",
            "--config.schedule.meta_masking.partial.start_prob=0.3",
            "--config.schedule.meta_masking.partial.end_prob=0.3",
            "--config.schedule.meta_masking.partial.end_fraction=1.0"]

# suite -> (variants {name: overrides}, metrics [(phase, metric)], headline (phase, metric)).
SUITES = {
    "metadata": (
        {"no metadata": [f"--config.data.meta.components.{c}.enabled=false" for c in COMPONENTS]
                        + ["--config.schedule.validation.partial_mask_meta.enabled=false",
                           "--config.schedule.validation.partial_mask_meta.whitelist=()",
                           "--config.schedule.meta_masking.enabled=false"],
         "metadata, no masking": ["--config.schedule.meta_masking.enabled=false"],
         "full masking": [],
         "full + partial masking": _PARTIAL},
        [("val", "acc1/taxa_L10"), ("val", "acc1/taxa_L20"), ("val", "acc1/taxa_L30"),
         ("val_mask_TEMPORAL", "acc1/taxa_L10"), ("val_mask_SPATIAL", "acc1/taxa_L10"),
         ("val_mask_ELEVATION", "acc1/taxa_L10"), ("val_mask_meta", "acc1/taxa_L10")],
        ("val", "acc1/taxa_L10")),
    "missing_token": (
        {"learned token": [],  # the default
         "zeros": ["--config.model.meta_missing=zeros"]},
        [("val", "acc1/taxa_L10"), ("val_mask_TEMPORAL", "acc1/taxa_L10"),
         ("val_mask_SPATIAL", "acc1/taxa_L10"), ("val_mask_ELEVATION", "acc1/taxa_L10"),
         ("val_mask_meta", "acc1/taxa_L10")],
        ("val", "acc1/taxa_L10")),
    "heads": (
        {"Linear": [], "HierarchicalSoftmax": _heads("HierarchicalSoftmax"),
         # soft routing at temperature 1 is HierarchicalSoftmax's computation: the same numbers
         "ConditionalClassifier (soft)": _heads("ConditionalClassifier",
                                                "routing_strategy=soft"),
         "ConditionalClassifier (gumbel)": _heads("ConditionalClassifier",
                                                  "routing_strategy=gumbel")},
        [("val", f"acc1/{t}") for t in TASKS] + [
            ("val", "chain_accuracy"), ("val", "mistake_severity/taxa_L10"),
            ("val", "hier_dist1/taxa_L10")],
        ("val", "chain_accuracy")),
    "nulls": (
        {"plain": [],
         "phase-1 null masking": ["--config.train.phase1_mask_null_loss=true"],
         # phase-1 masking takes precedence over scheduled inclusion: each on its own
         "scheduled null inclusion": ["--config.schedule.null_masking.enabled=true",
                                      "--config.schedule.null_masking.end_fraction=0.5"]},
        [("val", "acc1/taxa_L10"), ("val", "acc1_non_null/taxa_L10"),
         ("val", "acc1_null/taxa_L10"), ("val", "acc1/taxa_L20")],
        ("val", "acc1_non_null/taxa_L10")),
}


def report_of(workdir: str) -> dict | None:
  """The final validation report of a finished run (its highest eval/step_<N>.json)."""
  paths = glob.glob(os.path.join(workdir, "eval", "step_*.json"))
  if not paths:
    return None
  with open(max(paths, key=lambda p: int(re.findall(r"step_(\d+)", p)[-1])),
            encoding="utf-8") as f:
    return json.load(f)


def run_dir(runs: str, config: str, overrides: list[str], steps: int) -> str:
  """RUNS/<key>: the runs of one configuration (config file, overrides, steps), any suite's."""
  what = {"config": os.path.relpath(config, ROOT), "overrides": sorted(overrides), "steps": steps}
  key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
  folder = os.path.join(runs, key)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "variant.json"), "w", encoding="utf-8") as f:
    json.dump(what, f, indent=1)
  return folder


def check_variants(config: str, variants: dict, steps: int) -> None:
  """Every variant's config validated (with its data, as training would) before anything is
  trained: a suite does not stop on a bad variant an hour in. Raises naming every bad one."""
  problems = []
  for variant, overrides in variants.items():
    cmd = [sys.executable, "-m", "linnaeus_jax.tools.inspect_dataset", f"--config={config}",
           *overrides, *([f"--config.train.steps={steps}"] if steps else [])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
      last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
      problems.append(f"{variant}: {last}")
  if problems:
    raise ValueError("variants with an invalid config (nothing was trained):\n  "
                     + "\n  ".join(problems))


def run_one(config: str, workdir: str, seed: int, overrides: list[str], steps: int) -> float:
  """Trains (or resumes) one run; its wall seconds (0 when it was already finished)."""
  if report_of(workdir) is not None:
    print(f"  done before: {workdir}", flush=True)
    return 0.0
  cmd = [sys.executable, "-m", "linnaeus_jax.main", f"--config={config}",
         f"--workdir={workdir}", f"--config.misc.seed={seed}", *overrides]
  if steps:
    cmd.append(f"--config.train.steps={steps}")
  print("  $ python -m linnaeus_jax.main " + " ".join(cmd[3:]), flush=True)
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.log"), "w",
            encoding="utf-8") as log:
    r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if r.returncode != 0:
    raise RuntimeError(f"{workdir}: exit {r.returncode}; see {log.name}")
  wall = time.time() - t0
  with open(os.path.join(workdir, "wall_s.txt"), "w", encoding="utf-8") as f:
    f.write(f"{wall:.1f}\n")
  return wall


def mean_std(values: list[float]) -> str:
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def run_suite(name: str, variants: dict, metrics: list, headline: tuple, config: str,
              seeds: int, runs: str, out: str, steps: int = 0) -> dict:
  """Runs every (variant, seed) not yet done; writes OUT/<name>.md, .json, .png; returns the
  numbers {variant: {"phase/metric": [value per seed]}}."""
  check_variants(config, variants, steps)
  numbers, wall = {}, 0.0
  for variant, overrides in variants.items():
    numbers[variant] = {f"{p}/{m}": [] for p, m in metrics}
    for seed in range(seeds):
      workdir = os.path.join(run_dir(runs, config, overrides, steps), f"seed_{seed}")
      print(f"{name} / {variant} / seed {seed}", flush=True)
      run_one(config, workdir, seed, overrides, steps)
      wall_path = os.path.join(workdir, "wall_s.txt")
      wall += float(open(wall_path).read()) if os.path.exists(wall_path) else 0.0
      report = report_of(workdir)
      for p, m in metrics:
        if m in report.get(p, {}):  # e.g. no masked phases without metadata
          numbers[variant][f"{p}/{m}"].append(float(report[p][m]))
  os.makedirs(out, exist_ok=True)
  cmd = (f"python benchmarks/experiments.py --suite={name} --seeds={seeds} "
         f"--config={os.path.relpath(config, ROOT)}" + (f" --steps={steps}" if steps else ""))
  lines = [f"# Suite `{name}`", "",
           f"`{cmd}` on {platform.machine()} with {os.cpu_count()} cores "
           f"({platform.python_implementation()} {platform.python_version()}); {seeds} seed(s) per "
           f"variant; training wall time of all runs {wall / 60:.1f} min. Values: mean ± std "
           "(sample std over seeds) of the final validation, top-1 in percent.", "",
           "| variant | " + " | ".join(f"{p} {m}" for p, m in metrics) + " |",
           "|---|" + "---|" * len(metrics)]
  for variant, vals in numbers.items():
    lines.append(f"| {variant} | " + " | ".join(mean_std(vals[f"{p}/{m}"]) for p, m in metrics)
                 + " |")
  with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump({"command": cmd, "seeds": seeds, "wall_s": round(wall, 1), "numbers": numbers},
              f, indent=1)
  plot(numbers, f"{headline[0]}/{headline[1]}", name, os.path.join(out, f"{name}.png"))
  return numbers


def plot(numbers: dict, key: str, title: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(numbers)
  vals = [numbers[n][key] for n in names]
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.6), dpi=100)
  means = [np.mean(v) if v else 0.0 for v in vals]
  errs = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
  ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="#4c72b0")
  for i, v in enumerate(vals):
    ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
  ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
  ax.set_ylabel(key)
  ax.set_title(f"{title}: {key} (bars: mean ± std; dots: seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--suite", required=True, choices=sorted(SUITES))
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=0, help="train.steps override (0: the config's)")
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "demo_hard.py"))
  ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "experiments"))
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "experiments"))
  a = ap.parse_args()
  variants, metrics, headline = SUITES[a.suite]
  run_suite(a.suite, variants, metrics, headline, os.path.abspath(a.config), a.seeds,
            a.runs, a.out, a.steps)
  print(open(os.path.join(a.out, f"{a.suite}.md"), encoding="utf-8").read())


if __name__ == "__main__":
  main()
