"""Best-metric tracking and early stopping on a validation metric (docs/design.md#early-stopping).

The metric is named `<phase>/<name>` (`val/loss`, `val/acc1/taxa_L10`, `val_mask_meta/loss`).
Its direction is `mode` ('min' | 'max'; 'auto': min for names containing "loss"). Patience is
counted in evaluations without an improvement of at least `min_delta`. The state is a small
JSON-able dict kept in the checkpoint's progress record, so a resumed run continues counting.
"""

from __future__ import annotations

import math


def direction(metric: str, mode: str) -> str:
  if mode == "auto":
    return "min" if "loss" in metric else "max"
  return mode


def init_state() -> dict:
  return {"best": None, "best_step": None, "bad_evals": 0}


def lookup(results: dict, metric: str) -> float:
  """`results[phase][name]` for metric 'phase/name'; a clear error if it does not exist."""
  phase, _, name = metric.partition("/")
  if phase not in results or name not in results[phase]:
    known = sorted(f"{p}/{k}" for p, r in results.items() for k in r
                   if isinstance(r[k], (int, float)))
    raise KeyError(f"train.early_stop.metric {metric!r} is not computed; known: {known}")
  return float(results[phase][name])


def update(state: dict, value: float, step: int, mode: str, min_delta: float) -> tuple[dict, bool]:
  """(new state, improved): improved if better than the best by at least `min_delta`."""
  best = state["best"]
  if best is None:
    improved = math.isfinite(value)
  elif mode == "min":
    improved = value < best - min_delta
  else:
    improved = value > best + min_delta
  if improved:
    return {"best": value, "best_step": int(step), "bad_evals": 0}, True
  return dict(state, bad_evals=state["bad_evals"] + 1), False


def should_stop(state: dict, patience: int) -> bool:
  return state["bad_evals"] >= patience
