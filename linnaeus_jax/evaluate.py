"""Validation: deterministic metadata-masked passes, computed together in one pass over the data.

    python -m linnaeus_jax.evaluate --workdir=DIR [--step=N] [--config=CONFIG [--config.x=v]]

restores DIR's checkpoint (the latest, or step N) with the run's config (DIR/config.json unless
--config is given), runs every pass (val, val_mask_meta, the whitelisted and the exhaustive
combinations) on the validation split and writes DIR/eval/step_<N>.json: {phase: {metric: value}}
(the `val` phase also with "per_class": {task: [per-class top-1, precision, support, ...]}) and
DIR/eval/step_<N>_per_class.csv, and prints each rank's worst classes.

A phase is (name, components masked). `val` masks nothing, `val_mask_meta` everything, a
`val_mask_<A>_<B>` phase the listed components: their validity flags, never value slices
(docs/design.md#validation-masking-and-chain-accuracy). One jitted call evaluates every
phase of a batch: the model is `vmap`ped over the phases' validity flags, so the ConvNeXt stages,
which do not see metadata, run once per batch. No augmentation, no random masking.
"""

from __future__ import annotations

import csv
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax import config as config_lib
from linnaeus_jax import metrics, preprocessing, sharding, train_step
from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax import state as state_lib
from linnaeus_jax.data import pipeline


def phase_name(masked: tuple[str, ...], all_names: tuple[str, ...]) -> str:
  if not masked:
    return "val"
  if set(masked) == set(all_names):
    return "val_mask_meta"
  return "val_mask_" + "_".join(masked)


def phases(config, *, mask_meta=True, partial=False, exhaustive=False) -> tuple:
  """((name, masked component names), ...) for the requested kinds of pass, without repeats.

  partial: one per `schedule.validation.partial_mask_meta.whitelist` entry (listed order);
  exhaustive: every non-empty proper subset of `final_epoch.exhaustive_meta_components` (default:
  all enabled components), in idx order: 2^n - 2 passes.
  """
  names = tuple(n for n, _ in config_lib.enabled_components(config))
  v = config.schedule.validation
  out = [()]
  if mask_meta and names:
    out.append(names)
  if partial:
    out += [tuple(c) for c in v.partial_mask_meta.whitelist]
  if exhaustive and names:
    pool = [n for n in names if n in (v.final_epoch.exhaustive_meta_components or names)]
    out += [c for r in range(1, len(pool)) for c in itertools.combinations(pool, r)]
  named = {}
  for masked in out:
    named.setdefault(phase_name(masked, names), masked)
  return tuple(named.items())


CONFUSION_MAX_CLASSES = 64  # larger ranks are not plotted as a confusion matrix


def make_eval_step(graphdef, cfg: train_step.StepConfig, phase_list=(("val", ()),)):
  """step(variables, batch, consts) -> {phase: (counts, {task: (C, C) confusion counts} of the
  ranks with at most CONFUSION_MAX_CLASSES classes, {task: per-class counts (3, C)})}
  (`metrics.class_counts`).

  `variables`: (params, buffers) of the train state; `consts` from `state.loss_constants`. Pixels
  are normalised as in training (`cfg.image_mean/std`). The losses and counts are the train
  step's (`train_step.losses_and_counts` with the validation criteria), so `val/loss` is the
  quantity training minimises.
  """
  masks_KxC = np.array([[n in masked for n in cfg.components] for _, masked in phase_list],
                       bool).reshape(len(phase_list), len(cfg.components))
  def step(variables, batch, consts):
    image = preprocessing.normalize(batch["image"], cfg.image_mean, cfg.image_std)
    valid_KxBxC = batch["meta_valid"][None] & ~jnp.asarray(masks_KxC)[:, None, :]

    def forward(valid_BxC):
      logits = nnx.merge(graphdef, *variables)(image, batch["meta"], valid_BxC, train=False)
      _, counts = train_step.losses_and_counts(cfg, logits, batch, consts, train=False)
      confusion = {}
      for t in cfg.tasks:  # for the plots: ranks small enough to show as a matrix
        if (c := logits[t].shape[-1]) <= CONFUSION_MAX_CLASSES:
          true_BxC = jax.nn.one_hot(batch["labels"][t], c) * batch["example_mask"][:, None]
          pred_BxC = jax.nn.one_hot(jnp.argmax(logits[t], -1), c)
          confusion[t] = jnp.einsum("bi,bj->ij", true_BxC, pred_BxC)
      per_class = {t: metrics.class_counts(batch["labels"][t], logits[t], batch["example_mask"])
                   for t in cfg.tasks}
      return counts, confusion, per_class
    out = jax.vmap(forward)(valid_KxBxC)
    return {name: jax.tree.map(lambda x, k=k: x[k], out) for k, (name, _) in enumerate(phase_list)}
  return step


def jit_step(graphdef, cfg, phase_list, state_sharding, mesh):
  """`make_eval_step` jitted for the train state's shardings and the batch sharding."""
  variables = (state_sharding.params, state_sharding.buffers)
  repl = sharding.replicated(mesh)
  return jax.jit(make_eval_step(graphdef, cfg, phase_list),
                 in_shardings=(variables, sharding.batch_sharding(mesh), repl),
                 out_shardings=repl)


def run(eval_step, variables, dataset, mesh, tasks, consts=None, confusion=None,
        task_weights=None, class_counts=None) -> dict:
  """{phase: metrics} of `variables` (params, buffers) over `dataset`: counts summed over
  batches, then finalized; `loss` weighted by `task_weights` (the train state's), as the train
  loss is.

  `confusion`, a dict, receives {phase: {task: (C, C) counts}} (rows: true class) of the ranks
  with at most CONFUSION_MAX_CLASSES classes;
  `class_counts` {phase: {task: (3, C)}} (`metrics.class_counts`).
  """
  totals, conf, per_class, consts = {}, {}, {}, consts or {}
  for batch in dataset:
    out = jax.device_get(eval_step(variables, sharding.global_batch(batch, mesh), consts))
    totals = {p: metrics.accumulate(totals.get(p), c) for p, (c, _, _) in out.items()}
    conf = {p: {t: conf.get(p, {}).get(t, 0) + np.asarray(x, np.int64) for t, x in m.items()}
            for p, (_, m, _) in out.items()}
    per_class = {p: {t: per_class.get(p, {}).get(t, 0) + np.asarray(x, np.int64)
                     for t, x in pc.items()} for p, (_, _, pc) in out.items()}
  if confusion is not None:
    confusion.update(conf)
  if class_counts is not None:
    class_counts.update(per_class)
  if task_weights is not None:
    task_weights = np.asarray(jax.device_get(task_weights))
  return {p: metrics.finalize(t, tasks, task_weights) for p, t in totals.items()}


def per_class_rows(counts: dict, data) -> dict:
  """{task: `metrics.per_class` rows} from one phase's summed class counts, with each class's
  taxon id (0: null) and training count."""
  out = {}
  for j, t in enumerate(data.task_keys):
    ids = {i: (0 if k == "null" else int(k)) for k, i in data.class_to_idx[t].items()}
    c = counts[t].shape[1]
    out[t] = metrics.per_class(counts[t], [ids.get(i, -1) for i in range(c)],
                               np.bincount(data.train.labels[:, j], minlength=c))
    for row in out[t]:
      row["name"] = data.name(t, row["class"])
  return out


def write_eval(workdir: str, step: int, results: dict, rows: dict | None = None) -> str:
  """DIR/eval/step_<N>.json ({phase: metrics}, the `val` phase with "per_class": {task: rows})
  and, with `rows`, DIR/eval/step_<N>_per_class.csv (one line per task and class)."""
  folder = os.path.join(workdir, "eval")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"step_{step}.json")
  out = {p: dict(r) for p, r in results.items()}
  if rows is not None:
    out["val"]["per_class"] = rows
    fields = ["task", "class", "taxon_id", "name", "train_count", "support", "correct", "predicted",
              "top1", "precision"]
    with open(os.path.join(folder, f"step_{step}_per_class.csv"), "w", newline="",
              encoding="utf-8") as fh:
      w = csv.DictWriter(fh, fields)
      w.writeheader()
      for task, task_rows in rows.items():
        w.writerows({"task": task, **r} for r in task_rows)
  with open(path, "w", encoding="utf-8") as fh:
    json.dump(out, fh, indent=1, sort_keys=True)
  return path


WORST_HEADER = "worst taxa on val (top-1 of its val examples, its train examples):"


def worst_summary(rows: dict, k: int = 5) -> list[str]:
  """Console lines: each rank's `k` worst taxa on `val` by name (top-1, val and train
  examples), coarse to fine; the null class is left out."""
  out = []
  for t, task_rows in reversed(rows.items()):
    taxa = metrics.worst([r for r in task_rows if r["taxon_id"] != 0], k)
    out.append(f"  {t:<10} " + "; ".join(
        f"{r.get('name', r['taxon_id'])} {r['top1']:.0f}% of {r['support']} "
        f"(train {r['train_count']})" for r in taxa))
  return out


def results_table(results: dict, tasks: list[str]) -> list[str]:
  """Console lines of validation results: a header naming the ranks coarse to fine (the model
  card's order), then one line per phase with its loss and top-1 per rank."""
  coarse_first = list(reversed(tasks))
  width = max([28] + [len(p) for p in results])
  lines = [f"  {'phase':<{width}} {'loss':>9}  " + "  ".join(f"{t:>9}" for t in coarse_first)]
  for phase, r in results.items():
    lines.append(f"  {phase:<{width}} {r['loss']:9.4f}  "
                 + "  ".join(f"{r[f'acc1/{t}']:9.1f}" for t in coarse_first))
  return lines


def evaluate_checkpoint(config, workdir: str, step: int | None = None):
  """(step, {phase: metrics}, {task: per-class rows of `val`}) of DIR's checkpoint at `step`
  (default: the latest)."""
  config, data = resolve_lib.resolve(config, jax.device_count())
  if not len(data.val):
    raise ValueError("the configuration has no validation rows to evaluate")
  mesh = sharding.make_mesh(config)
  step, state, graphdef, state_sharding = state_lib.restore_state(
      config, workdir, data.taxonomy.parents, mesh, step)
  plist = phases(config, partial=True, exhaustive=True)
  eval_step = jit_step(graphdef, train_step.StepConfig.from_config(config), plist,
                       state_sharding, mesh)
  ds = pipeline.eval_dataset(data, config, jax.process_index(), jax.process_count())
  counts = {}
  results = run(eval_step, (state.params, state.buffers), ds, mesh, data.task_keys,
                state_lib.loss_constants(config, data), task_weights=state.gradnorm["weights"],
                class_counts=counts)
  return step, results, per_class_rows(counts["val"], data)


def read_run_config(path: str):
  """A run's DIR/config.json; ValueError naming the file if it is not a config (not JSON, not an
  object, a value of the wrong type), OSError if it cannot be read."""
  try:
    with open(path, encoding="utf-8") as fh:
      text = fh.read()
    if not isinstance(json.loads(text), dict):
      raise ValueError("not a JSON object")
    return config_lib.from_json(text)
  except OSError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}") from e


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  f = flags.FLAGS
  # Checked before anything loads: Orbax would create DIR/checkpoints/ for a missing DIR.
  if not os.path.isdir(f.workdir):
    cli.fail(f"workdir {f.workdir} not found")
  if not os.path.isdir(os.path.join(f.workdir, "checkpoints")):
    cli.fail(f"{f.workdir} has no checkpoints/ folder: is it a training workdir?")
  config = f.config  # without --config: the run's own (DIR/config.json)
  if config is None:
    config = cli.call(read_run_config, os.path.join(f.workdir, "config.json"))
  step, results, rows = cli.call(evaluate_checkpoint, config, f.workdir, f.step)
  path = write_eval(f.workdir, step, results, rows)
  tasks = list(config.data.task_keys_h5)
  print(f"step {step}: top-1 (%) per rank")
  print("\n".join(results_table(dict(sorted(results.items())), tasks)))
  print(WORST_HEADER)
  print("\n".join(worst_summary(rows)))
  print(f"wrote {path} and its _per_class.csv")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from linnaeus_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()); default: the "
                                  "run's DIR/config.json. --config.x=v overrides need it.",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "The training run's folder (checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
