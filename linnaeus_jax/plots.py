"""Evaluation figures: metadata-ablation bar chart, confusion matrices and per-class accuracy
against training count.

Each plot saves a PNG and returns the same image as an (H, W, 3) uint8 array, ready for
TensorBoard's `add_image(..., dataformats="HWC")`. Figure sizes are capped, so any number of
classes renders at a bounded resolution.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

_DPI = 100
_MAX_INCHES = 20.0
_MAX_TICKS = 40
_MAX_ANNOTATED = 15
_MAX_BAR_LABELS = 60


def phase_order(phases) -> list[str]:
  """Orders phases: `val`, then `val_mask_*` sorted, then `val_mask_meta`, then others sorted."""

  def key(p):
    if p == "val":
      return (0, p)
    if p == "val_mask_meta":
      return (2, p)
    if p.startswith("val_mask_"):
      return (1, p)
    return (3, p)

  return sorted(dict.fromkeys(phases), key=key)


def row_normalize(counts) -> np.ndarray:
  """Divides each row by its sum (float64); rows summing to zero stay zero."""
  counts = np.asarray(counts, dtype=np.float64)
  sums = counts.sum(axis=-1, keepdims=True)
  return np.divide(counts, sums, out=np.zeros_like(counts), where=sums != 0)


def _finish(fig, path: str) -> np.ndarray:
  """Renders `fig`, closes it, writes the RGB image to `path` and returns it."""
  try:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  finally:
    plt.close(fig)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")
  return image


def meta_ablation(results: dict[str, dict], task_keys: list[str], path: str) -> np.ndarray:
  """Grouped bar chart of top-1 accuracy (%) per rank, one bar per evaluation phase.

  Args:
    results: phase -> metrics dict holding `acc1/<task>` (percent); missing values are blank.
    task_keys: the ranks, one x group each.
    path: where to write the PNG (parent directories are created).

  Returns:
    The rendered image, (H, W, 3) uint8.
  """
  phases = phase_order(results)
  n_tasks, n_phases = len(task_keys), max(len(phases), 1)
  values = np.array([[float(results[p].get(f"acc1/{t}", np.nan)) for t in task_keys]
                     for p in phases], dtype=np.float64).reshape(len(phases), n_tasks)
  width_in = min(_MAX_INCHES, max(6.0, 2.0 + n_tasks * (0.3 + 0.35 * n_phases)))
  fig, ax = plt.subplots(figsize=(width_in, 5.0), dpi=_DPI)
  x = np.arange(n_tasks)
  bar_w = 0.8 / n_phases
  cmap = plt.get_cmap("tab10" if n_phases <= 10 else "tab20")
  label_bars = len(phases) * n_tasks <= _MAX_BAR_LABELS
  for i, phase in enumerate(phases):
    offset = (i - (n_phases - 1) / 2) * bar_w
    bars = ax.bar(x + offset, np.nan_to_num(values[i], nan=0.0), bar_w, label=phase,
                  color=cmap(i % cmap.N))
    if label_bars:
      labels = ["" if np.isnan(v) else f"{v:.1f}" for v in values[i]]
      ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
  ax.set_xticks(x)
  tilt = n_tasks > 6
  ax.set_xticklabels(task_keys, rotation=30 if tilt else 0, ha="right" if tilt else "center")
  ax.set_ylabel("Top-1 accuracy (%)")
  finite = values[np.isfinite(values)]
  ax.set_ylim(0, max(100.0, float(finite.max()) if finite.size else 0.0) * 1.08)
  ax.set_title("Top-1 by metadata ablation")
  if phases:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return _finish(fig, path)


def confusion_matrix(counts_CxC: np.ndarray, class_names: list[str], path: str,
                     title: str) -> np.ndarray:
  """Row-normalised confusion heat map (rows: true class, columns: predicted class).

  Tick labels are thinned to at most 40 per axis; cell values are printed when C <= 15.

  Args:
    counts_CxC: (C, C) counts, `counts[true, pred]`.
    class_names: C names.
    path: where to write the PNG (parent directories are created).
    title: figure title.

  Returns:
    The rendered image, (H, W, 3) uint8.
  """
  counts = np.asarray(counts_CxC)
  if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
    raise ValueError(f"expected a square (C, C) matrix, got {counts.shape}")
  c = counts.shape[0]
  if len(class_names) != c:
    raise ValueError(f"{len(class_names)} class names for {c} classes")
  norm = row_normalize(counts)
  side = min(_MAX_INCHES, max(5.0, 3.0 + 0.45 * min(c, _MAX_TICKS)))
  fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=_DPI)
  # Above ~200 classes a cell is < ~8 px, so filter the image rather than drop rows/columns.
  im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0,
                 interpolation="nearest" if c <= 200 else "antialiased",
                 aspect="auto" if c > _MAX_TICKS else "equal")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  step = max(1, math.ceil(c / _MAX_TICKS))
  ticks = np.arange(0, c, step)
  names = [str(class_names[i]) for i in ticks]
  fontsize = 8 if len(ticks) <= 20 else 6
  ax.set_xticks(ticks)
  ax.set_xticklabels(names, rotation=90, fontsize=fontsize)
  ax.set_yticks(ticks)
  ax.set_yticklabels(names, fontsize=fontsize)
  ax.set_xlabel("Predicted")
  ax.set_ylabel("True")
  ax.set_title(title)
  if c <= _MAX_ANNOTATED:
    for i in range(c):
      for j in range(c):
        v = norm[i, j]
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v > 0.5 else "black")
  fig.tight_layout()
  return _finish(fig, path)


def class_accuracy_vs_count(rows: list[dict], path: str, title: str) -> np.ndarray:
  """Per-class top-1 on validation against the class's training examples (log scale), a point
  per class with validation examples, its area growing with them: where the long tail fails.

  `rows`: `metrics.per_class` rows of one rank.
  """
  seen = [r for r in rows if r["support"] > 0]
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=_DPI)
  if seen:
    x = np.array([max(r["train_count"], 1) for r in seen], float)
    y = np.array([r["top1"] for r in seen], float)
    ax.scatter(x, y, s=8 + 40 * np.sqrt(np.array([r["support"] for r in seen]) /
                                      max(r["support"] for r in seen)), alpha=0.5)
    ax.set_xscale("log")
  ax.set_xlabel("training examples of the class (log)")
  ax.set_ylabel("top-1 on its validation examples, %")
  ax.set_ylim(-3, 103)
  ax.set_title(f"{title} ({len(seen)} classes with validation examples)")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  return _finish(fig, path)
