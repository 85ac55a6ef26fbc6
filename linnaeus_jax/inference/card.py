"""Model cards: what a bundle's model is, what it was trained on, how well it did, and where it
should not be trusted. `card.json` (served by `GET /info`) and the same facts as `README.md`.

Built at export from the workdir: the config, the preprocessing record, `assets/
data_summary.json` (rows, classes, metadata validity) and the last validation records of every
phase in `metrics.jsonl` (the masked-metadata phases included). A bundle without a card (an
older or an original one) gets one built from what it holds, its unknowns marked as such.
"""

from __future__ import annotations

import json
import os

import numpy as np

from linnaeus_jax import config as config_lib
from linnaeus_jax.inference import bundle as bundle_lib

VERSION = 1
_KEEP = ("loss", "acc1/", "acc5/", "chain_accuracy", "mistake_severity")


def final_validation(metrics_path: str, step: int | None = None) -> dict:
  """{phase: {"step", metric: value}} of the latest validation records (at most `step`) of
  every validation phase in metrics.jsonl: losses, top-1/top-5 per rank, chain accuracy and
  mistake severity."""
  out = {}
  if not os.path.exists(metrics_path):
    return out
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      phase = rec.get("phase", "")
      if not phase.startswith("val") or (step is not None and rec["step"] > step):
        continue
      if phase not in out or rec["step"] >= out[phase]["step"]:
        out[phase] = {"step": rec["step"], **{k: v for k, v in rec.items()
                                             if k.startswith(_KEEP) and not k.startswith("loss_")}}
  return dict(sorted(out.items()))


def build(config, record: dict, params: dict | None, facts: dict | None, validation: dict,
          provenance: dict) -> dict:
  """The card as a JSON-serialisable dict."""
  m, heads = config.model, config.model.classification.heads
  tasks = sorted(config.data.task_keys_h5, key=config_lib.task_level, reverse=True)
  n_params = (int(sum(np.size(x) for x in _leaves(params["params"]))) if params else None)
  c, lr = config.train, config.lr_scheduler
  mm = config.schedule.meta_masking
  return {
      "card_version": VERSION,
      "model": {"architecture": m.name, "parameters": n_params,
                "convnext_dims": list(m.convnext_stages.dims),
                "rope_depths": list(m.rope_stages.depths),
                "heads": {t: heads[t].type for t in tasks},
                "image_size": int(record["image"]["size"]),
                "normalization": {k: record["image"].get(k) for k in ("mean", "std")},
                "meta_missing": m.meta_missing},
      "tasks_coarse_to_fine": tasks,
      "classes": {t: int(heads[t].num_classes) for t in tasks},
      "null_class": bool(config.data.partial.levels),
      "metadata": [{k: comp[k] for k in ("name", "encoder", "dim") if k in comp}
                   for comp in record["metadata"]],
      "data": facts,
      "training": {"steps": provenance.get("step"), "epochs": c.epochs if not c.steps else None,
                   "global_batch": config.data.batch_size, "optimizer": config.optimizer.name,
                   "base_lr": lr.base_lr, "lr_schedule": lr.name,
                   "metadata_masking": {"full": bool(mm.enabled),
                                        "partial": bool(mm.partial.enabled)},
                   "mixing": bool(config.schedule.mix.prob.enabled), "seed": config.misc.seed,
                   "init": {k: v for k, v in m.init.to_dict().items() if v and isinstance(v, str)}},
      "validation": validation,
      "provenance": provenance,
      "intended_use": (
          "Ranking candidate taxa, coarse to fine, for photographs similar to the training data "
          "(same kind of camera, framing and region), optionally with where and when they were "
          "taken; as a suggestion to a person or a filter in a pipeline, with the probabilities "
          "read as scores."),
      "limitations": [
          "It only knows the classes of its training data; any other taxon is given one of those.",
          "Probabilities are not calibrated: compare them within a prediction, not across models.",
          "Accuracy is that of the validation split above; rare classes (few training rows) and "
          "images or places unlike the training data do worse.",
          "Missing metadata is supported (see the masked-metadata phases above for its cost); "
          "wrong metadata (a swapped lat/lon, a local time given as UTC) misleads it.",
      ],
  }


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def markdown(card: dict) -> str:
  """README.md of a bundle: the card for people."""
  mod, tr = card["model"], card["training"]
  lines = [f"# Model card: {mod['architecture']} ({', '.join(card['tasks_coarse_to_fine'])})", "",
           "## Model", "",
           f"- {mod['architecture']}, {mod['parameters']:,} parameters" if mod["parameters"]
           else f"- {mod['architecture']}",
           f"- input: {mod['image_size']} x {mod['image_size']} RGB, normalised with mean "
           f"{mod['normalization']['mean']} and std {mod['normalization']['std']}",
           "- heads: " + ", ".join(f"{t} {h} ({card['classes'][t]} classes)"
                                   for t, h in mod["heads"].items())
           + ("; class 0 of every rank is 'unknown' (null)" if card["null_class"] else ""),
           "- metadata: " + (", ".join(f"{c['name']} ({c.get('encoder', '?')}, {c['dim']} values)"
                                       for c in card["metadata"]) or "none")
           + f"; a missing component is fed as `{mod['meta_missing']}`", "", "## Data", ""]
  d = card["data"]
  if d:
    rows = d["rows"]
    lines += [f"- {rows['train']:,} training and {rows['val']:,} validation rows "
              f"(of {rows['total']:,} in the labels file)",
              "- classes per rank: " + ", ".join(f"{t} {n}" for t, n in d["classes"].items())]
    for split, fr in d["metadata_valid_fraction"].items():
      if fr:
        lines.append(f"- metadata present ({split}): "
                     + ", ".join(f"{k} {100 * v:.0f}%" for k, v in fr.items() if v is not None))
  else:
    lines.append("- not recorded (a bundle from before model cards, or from another framework)")
  lines += ["", "## Training", ""]
  lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in tr.items() if v not in (None, {}, "")]
  lines += ["", "## Validation (final)", ""]
  val = card["validation"]
  if val:
    tasks = card["tasks_coarse_to_fine"]
    lines += ["| phase | step | loss | " + " | ".join(f"top-1 {t}" for t in tasks) + " |",
              "|---|---|---|" + "---|" * len(tasks)]
    for phase, r in val.items():
      accs = " | ".join(f"{r[f'acc1/{t}']:.1f}" if f"acc1/{t}" in r else "" for t in tasks)
      loss = f"{r['loss']:.4f}" if "loss" in r else ""
      lines.append(f"| {phase} | {r['step']} | {loss} | {accs} |")
    lines += ["", "`val_mask_<components>` phases ran with those metadata components withheld: "
              "the accuracy to expect when a request lacks them."]
  else:
    lines.append("Not recorded.")
  lines += ["", "## Intended use", "", card["intended_use"], "", "## Limits", ""]
  lines += [f"- {x}" for x in card["limitations"]]
  lines += ["", "## Provenance", ""]
  lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in card["provenance"].items()]
  return "\n".join(lines) + "\n"


def read_or_build(bundle: str) -> dict:
  """The bundle's card.json, or a card built from its config and record."""
  path = os.path.join(bundle, "card.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  b = bundle_lib.read(bundle)
  info = b.get("info") or {}
  return build(b["config"], b["preprocessing"], b["variables"], None, {},
               {k: info[k] for k in ("source_workdir", "step", "created") if k in info})
