"""The training loop: data, state, the jitted steps, validation, checkpoints and logs.

`run` resolves the config once (`resolve.py`: frozen from then on), takes the workdir's lock and
calls `_train`, which sets up the step, the state and the helpers below, then runs the loop.
One train step (`train_step.py`) is one optimizer update, `jax.jit`-ed over the device mesh with
the state donated. `Due` decides every periodic action; `Validator`, `Saver` and `TrainLog`
carry them out and receive the state explicitly. The loop runs under `train.transfer_guard`:
host syncs happen only where written (`jax.device_get`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import assets
from linnaeus_jax import checkpoint as ckpt_lib
from linnaeus_jax import config as config_lib
from linnaeus_jax import early_stopping, evaluate, memory, metric_writers, metrics, optim, plots
from linnaeus_jax import preemption, pretrained, sharding, train_step, workdir_lock
from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax import schedules as schedules_lib
from linnaeus_jax import state as state_lib
from linnaeus_jax.data import images as images_lib
from linnaeus_jax.data import pipeline


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def run(config, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last validation metrics.

  SIGTERM ends the run after the current step with a checkpoint (`preemption.py`); rerunning
  resumes from the latest checkpoint. One run at a time per workdir (`workdir_lock.py`).
  """
  images_lib.reset_unreadable()
  mesh = sharding.make_mesh(config)
  start = resolve_lib.for_training(config, workdir, mesh)  # checked before the workdir exists
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    with workdir_lock.acquire(workdir), contextlib.ExitStack() as cleanup:
      return _train(start, mesh, workdir, cleanup)
  except Exception:
    if created and jax.process_index() == 0 and not _has_results(workdir):
      shutil.rmtree(workdir)  # failed before a checkpoint or a metric (a batch too big, bad data)
    raise


def _has_results(workdir: str) -> bool:
  """Whether a run left anything worth keeping: a checkpoint or a metrics record."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  return bool(ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints"))) or (
      os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0)


# ----------------------------------------------------------------------------- Periodic actions


@dataclasses.dataclass(frozen=True)
class Due:
  """Which periodic actions are due after `step` updates: every interval in steps (0: never),
  resolved once from the config's durations. Validation and checkpoints are not periodic at the
  last step (the run ends with its own); logs are."""
  total: int
  steps_per_epoch: int
  every: dict  # action -> interval in steps: log, console, validate, mask_meta, partial, checkpoint

  @classmethod
  def from_config(cls, config, total: int, spe: int) -> "Due":
    s, vs = config.schedule, config.schedule.validation
    pm = vs.partial_mask_meta
    every = {"log": s.metrics.tensorboard_interval, "console": s.metrics.console_interval,
             "validate": _steps(vs, "interval", total, spe),
             "mask_meta": _steps(vs, "mask_meta_interval", total, spe),
             "partial": _steps(pm, "interval", total, spe) if pm.enabled else 0,
             "checkpoint": _steps(s.checkpoint, "interval", total, spe)}
    return cls(total, spe, every)

  def __call__(self, step: int) -> frozenset:
    due = {a for a, n in self.every.items() if n > 0 and step % n == 0}
    if step == self.total:
      return frozenset(due & {"log", "console"} | {"console"})
    return frozenset(due)


def _steps(node, name: str, total: int, spe: int) -> int:
  return config_lib.resolve_steps(node[f"{name}_steps"], node[f"{name}_fraction"],
                                  node[f"{name}_epochs"], total, spe)


class Profile:
  """A TensorBoard profile of the steps in [start, stop) (`logging.profile_steps`), written to
  DIR/tensorboard/plugins/profile; nothing when unset."""

  def __init__(self, workdir: str, steps):
    self.start, self.stop = (tuple(steps) + (-1, -1))[:2]
    self.folder, self.on = os.path.join(workdir, "tensorboard"), False

  def before(self, step: int) -> None:
    if step == self.start and not self.on:
      jax.profiler.start_trace(self.folder)
      self.on = True
    elif step == self.stop:
      self.close()

  def close(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


# ----------------------------------------------------------------------------- Validation


class Validator:
  """Every validation phase due at a step in one pass over the data; logs and prints them, and
  at the end of the run writes the per-class rows, the worst taxa and the plots."""

  def __init__(self, config, data, graphdef, state_sharding, mesh, consts, writer, workdir,
               progress_bar):
    self.config, self.data, self.graphdef = config, data, graphdef
    self.state_sharding, self.mesh, self.consts = state_sharding, mesh, consts
    self.writer, self.workdir, self.progress_bar = writer, workdir, progress_bar
    self.step_cfg = train_step.StepConfig.from_config(config)
    self.compiled = {}  # one eval step per set of phases

  def __call__(self, state, step: int, due=frozenset(), final: bool = False) -> dict:
    config, data, pidx = self.config, self.data, jax.process_index()
    ds = pipeline.eval_dataset(data, config, pidx, jax.process_count())
    if ds is None:
      return {}
    vs = config.schedule.validation
    plist = evaluate.phases(
        config, mask_meta=final or "mask_meta" in due,
        partial=vs.partial_mask_meta.enabled and (final or "partial" in due),
        exhaustive=final and vs.final_epoch.exhaustive_partial_meta_validation)
    if plist not in self.compiled:
      self.compiled[plist] = evaluate.jit_step(self.graphdef, self.step_cfg, plist,
                                               self.state_sharding, self.mesh)
    t0, confusion, class_counts, tasks = time.time(), {}, {}, data.task_keys
    results = evaluate.run(self.compiled[plist], (state.params, state.buffers), ds, self.mesh,
                           tasks, self.consts, confusion, task_weights=state.gradnorm["weights"],
                           class_counts=class_counts)
    for phase, result in results.items():
      result["duration_sec"] = time.time() - t0
      self.writer.write(step, phase, result)
    if pidx == 0:
      self.progress_bar.newline()
      print(f"[validation step {step}, {time.time() - t0:.1f} s] top-1 (%) per rank:\n"
            + "\n".join(evaluate.results_table(results, tasks)), flush=True)
      if final:
        self._final_outputs(step, results, confusion["val"], class_counts["val"])
    return results

  def _final_outputs(self, step: int, results: dict, confusion: dict, class_counts) -> None:
    rows = evaluate.per_class_rows(class_counts, self.data)
    evaluate.write_eval(self.workdir, step, results, rows)
    worst = evaluate.worst_summary(rows)
    print(evaluate.WORST_HEADER + "\n" + "\n".join(worst), flush=True)
    self.writer.text(step, "val/worst_classes", "\n\n".join(w.strip() for w in worst))
    write_plots(self.workdir, step, results, confusion, self.data, self.writer, rows)


def write_plots(workdir: str, step: int, results: dict, confusion: dict, data, writer,
                per_class=None) -> None:
  """DIR/plots/meta_ablation.png, a confusion matrix (`confusion_rank`) and the finest rank's
  per-class accuracy against training count, also to TensorBoard."""
  tasks = data.task_keys
  images = {"meta_ablation": plots.meta_ablation(
      results, tasks, os.path.join(workdir, "plots", "meta_ablation.png"))}
  if (task := confusion_rank(results["val"], confusion, tasks)) is not None:
    matrix = confusion[task]
    images[f"confusion/{task}"] = plots.confusion_matrix(
        matrix, [data.name(task, i) for i in range(len(matrix))],
        os.path.join(workdir, "plots", f"confusion_{task}.png"), f"{task}, step {step}")
  if per_class is not None:
    fine = tasks[0]
    images[f"class_accuracy_vs_count/{fine}"] = plots.class_accuracy_vs_count(
        per_class[fine], os.path.join(workdir, "plots", f"class_accuracy_vs_count_{fine}.png"),
        f"{fine}, step {step}")
  for tag, image in images.items():
    writer.image(step, f"val/{tag}", image)


def confusion_rank(val: dict, confusion: dict, tasks: list[str]) -> str | None:
  """The rank whose confusion matrix says something: the finest of those small enough to plot
  whose top-1 is below 100% (else the coarsest of them; None when none is small enough)."""
  plotted = [t for t in tasks if t in confusion]
  imperfect = [t for t in plotted if val[f"acc1/{t}"] < 100.0]
  return (imperfect or plotted[::-1] or [None])[0]


# ----------------------------------------------------------------------------- Checkpoints


class Saver:
  """Checkpoints a finite state with the run's progress; a provisional one is confirmed by a
  finite next step, or deleted (`settle`)."""

  def __init__(self, ckpt, config, total: int, spe: int, data_from: int):
    self.ckpt, self.total, self.spe, self.data_from = ckpt, total, spe, data_from
    self.record = json.loads(config_lib.to_json(config))
    self.finite = jax.jit(state_lib.is_finite)

  def save(self, state, train_iter, step: int, prog: dict, last_val: dict, metric=None,
           provisional: bool = True) -> None:
    if not jax.device_get(self.finite(state)):
      _log(f"\nstep {step}: no checkpoint: the train state or its last step is not finite. "
           f"{self.last_good()}")
      return
    progress = {"step": step, "epoch": step / self.spe, "total_steps": self.total,
                "process_count": jax.process_count(), "data_from": self.data_from, **prog,
                "last_val": last_val, "config": self.record}
    with jax.transfer_guard("allow"):  # Orbax copies the state to the host: a written sync
      self.ckpt.save(step, state, train_iter, progress, metric, provisional)

  def exit_preempted(self, state, train_iter, step: int, prog: dict, last_val: dict,
                     saved: bool) -> None:
    """SIGTERM: saves the state at `step` (unless just saved), waits for it, and ends the run."""
    if not saved:
      self.save(state, train_iter, step, prog, last_val, provisional=False)
    self.ckpt.wait()
    _log(f"\nSIGTERM: saved the checkpoint at step {step} in {self.ckpt.directory}; exiting. "
         "Rerun the same command to resume.")
    raise preemption.Preempted(step)

  def settle(self, state, step: int) -> None:
    """After the step that followed a provisional save: keep it if that step was finite."""
    if not self.ckpt.provisional:
      return
    if jax.device_get(state.nonfinite_streak) == 0:
      self.ckpt.confirm()
    else:
      _log(f"\ncheckpoint(s) {self.ckpt.discard()} deleted: step {step} after them was "
           f"non-finite. {self.last_good()}")

  def last_good(self) -> str:
    """Names the newest confirmed checkpoint, the one a rerun resumes from."""
    self.ckpt.wait()
    good = [s for s in self.ckpt.steps() if s not in self.ckpt.provisional]
    if not good:
      return (f"No checkpoint was saved before this (none in {self.ckpt.directory}): a rerun "
              "starts over.")
    return f"The last good checkpoint (step {good[-1]}) is kept in {self.ckpt.directory}."


def _resume_point(ckpt, config, abstract, pcount: int):
  """(step, data_from, same_layout) of the checkpoint to resume from (the latest, or
  `train.resume_step` with the damaged later ones set aside); (None, 0, False) without one.

  The train order is a pure function of the step, so the input restarts exactly at the
  checkpoint's step on any process count: with the same count, Grain's saved iterator state is
  restored into a dataset starting where the saved one did (`data_from`); with another count,
  each process's saved position is for a slice it no longer reads, so a new dataset starts at
  the checkpoint's step instead (every example of the epoch still once, none repeated)."""
  start = ckpt.latest_step()
  if start is None:
    return None, 0, False
  n = config.train.resume_step
  if 0 <= n != start:
    if (moved := ckpt.set_aside_after(n, abstract)):
      _log(f"train.resume_step={n}: damaged checkpoint(s) {moved} moved to "
           f"{ckpt.directory}_set_aside")
      start = n
    else:
      _log(f"train.resume_step={n} ignored: a later checkpoint is intact")
  ckpt.check(start, abstract)
  saved = ckpt.progress(start)
  saved_by = saved.get("process_count", pcount)
  if saved_by == pcount:
    return start, saved.get("data_from", 0), True
  _log(f"the checkpoint at step {start} was written by {saved_by} process(es), this run has "
       f"{pcount}: the input restarts at step {start} in each process's new slice")
  return start, start, False


# ----------------------------------------------------------------------------- Train metrics


class TrainLog:
  """Sums the steps' accuracy counts on the device and, at log steps, fetches them with the
  step's losses: TensorBoard, metrics.jsonl and the progress line."""

  def __init__(self, writer, progress_bar, tasks, batch: int, spe: int, start: int):
    self.writer, self.progress_bar, self.tasks = writer, progress_bar, tasks
    self.batch, self.spe = batch, spe
    self.acc_sum, self.t_last, self.s_last = None, time.time(), start

  def add(self, acc) -> None:
    self.acc_sum = acc if self.acc_sum is None else jax.tree.map(jnp.add, self.acc_sum, acc)

  def write(self, step: int, out: dict, due) -> dict:
    out, acc = jax.device_get((out, self.acc_sum))
    self.acc_sum = None
    m = {k: float(v) for k, v in out.items()}
    # Accuracies etc. over every sample since the last log (the losses are the step's own).
    m.update({k: v for k, v in metrics.finalize(
        {k: float(v) for k, v in acc["counts"].items()}, self.tasks).items()
              if not k.startswith("loss") and k != "num_examples"})
    # Measured since the last log: the fraction of samples whose component the schedule masked,
    # and of batches that were mixed.
    m.update({f"meta_masking/masked_frac/{c}": float(v) / max(int(acc["real"]), 1)
              for c, v in acc["masked"].items()})
    m["mix/mixed_batch_frac"] = float(acc["mixed"]) / max(int(acc["steps"]), 1)
    now = time.time()
    m["img_per_sec"] = (step - self.s_last) * self.batch / max(now - self.t_last, 1e-9)
    self.t_last, self.s_last = now, step
    m["epoch"] = step / self.spe
    if "log" in due:
      self.writer.write(step, "train", m)
    if "console" in due:
      self.progress_bar.update(step, m["loss"])
    return m


# ----------------------------------------------------------------------------- The run


def _train(start_point: resolve_lib.Run, mesh, workdir: str, cleanup) -> dict:
  """`run` once the config and the data (and model.init's weights) are known good."""
  config, data = start_point.config, start_point.data
  _log(f"data: {data.summary()}")

  # ---- The step, compiled before any state or checkpoint exists, so that a batch too big for
  # the device stops here, with the numbers.
  spe = pipeline.steps_per_epoch(pipeline.train_groups(data, config), config.data.batch_size)
  total = config_lib.total_steps(config, spe)
  due = Due.from_config(config, total, spe)
  tx, lrs = optim.build(config, total, spe)
  # Replicated on the mesh once: else every step copies them there, an implicit transfer that
  # train.transfer_guard='disallow' refuses with several processes.
  consts = jax.device_put(state_lib.loss_constants(config, data), sharding.replicated(mesh))
  graphdef, init = state_lib.create_state(config, data.taxonomy.parents)
  abstract, state_sharding = state_lib.abstract_state(init, tx, mesh, config)
  step_fn = _compile_step(config, data, graphdef, tx, lrs, total, spe, mesh, state_sharding,
                          abstract, consts)

  # ---- Checkpoints, data and state: resumed, or fresh (from model.init's weights).
  es = config.train.early_stop
  es_mode = early_stopping.direction(es.metric, es.mode)
  ckpt = cleanup.enter_context(ckpt_lib.Checkpointer(  # closing waits for asynchronous saves
      os.path.join(workdir, "checkpoints"), config.schedule.checkpoint.keep_last_n,
      keep_top_n=config.schedule.checkpoint.keep_top_n, best_mode=es_mode))
  start, data_from, train_iter, state, prog = _resume_or_start(
      ckpt, start_point, abstract, init, tx, state_sharding, workdir, total)
  end = total if prog["stopped_at"] is None else prog["stopped_at"]

  # ---- Logs, validation, checkpoints.
  closing = lambda x: cleanup.enter_context(contextlib.closing(x))
  writer = closing(metric_writers.MetricWriter(  # records past the checkpoint: to be redone
      workdir, resume_step=start, redo_eval_at_resume=start == end,
      wandb_config=config.logging.wandb, run_config=json.loads(config_lib.to_json(config))))
  _print_header(config.data.batch_size, data, mesh, state, total, spe, workdir)
  progress_bar = metric_writers.Progress(total, start, config.data.batch_size)
  validate = Validator(config, data, graphdef, state_sharding, mesh, consts, writer, workdir,
                       progress_bar)
  saver = Saver(ckpt, config, total, spe, data_from)
  log = TrainLog(writer, progress_bar, data.task_keys, config.data.batch_size, spe, start)
  preempt = closing(preemption.Watch())
  profile = closing(Profile(workdir, config.logging.profile_steps))

  # ---- The loop.
  keep_top_n = config.schedule.checkpoint.keep_top_n
  last_val, track_best = {}, es.active or keep_top_n > 0
  with jax.transfer_guard(config.train.transfer_guard):
    for step in range(start, end):
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, out = step_fn(state, sharding.global_batch(next(train_iter), mesh), consts)
      done = step + 1
      saver.settle(state, done)
      log.add(out.pop("acc"))  # summed on the device: no host sync
      now, saved = due(done), False
      if now & {"log", "console"}:
        log.write(done, out, now)
        _check_finite(state, config.train.nonfinite_patience, done, saver)  # fetched anyway
      if now & {"validate", "mask_meta", "partial"}:
        results = validate(state, done, now)
        last_val = results.get("val", {})
        if track_best:
          saved = _track_best(results, done, prog, es, es_mode, keep_top_n, saver, state,
                              train_iter, last_val)
        if prog["stopped_at"] is not None:
          break
      if "checkpoint" in now and not saved:
        saver.save(state, train_iter, done, prog, last_val)
        saved = True
      if preempt.reached(done) and done != total:
        saver.exit_preempted(state, train_iter, done, prog, last_val, saved)
    end = total if prog["stopped_at"] is None else prog["stopped_at"]
    if ckpt.latest_step() != end:
      saver.save(state, train_iter, end, prog, last_val, provisional=False)
    elif start == end:
      _log(f"Training already finished at step {end}; running the final validation.")
    last_val = validate(state, end, final=True).get("val", {})
  _log(closing_lines(workdir, end, bool(last_val)))
  return last_val


def _compile_step(config, data, graphdef, tx, lrs, total, spe, mesh, state_sharding, abstract,
                  consts):
  """The train step jitted for the mesh (state donated), compiled from abstract values and
  checked against the devices' memory."""
  batch_sharding, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      (config.data.batch_size,) + np.shape(x), np.asarray(x).dtype, sharding=batch_sharding),
                      pipeline.padding_record(data, config))
  step = train_step.make_train_step(graphdef, tx, train_step.StepConfig.from_config(config), lrs,
                                    schedules_lib.Schedules.from_config(config, total, spe))
  compiled = jax.jit(step, in_shardings=(state_sharding, batch_sharding, repl),
                     out_shardings=(state_sharding, repl),
                     donate_argnums=(0,)).lower(abstract, spec, consts).compile()
  memory.check_memory(compiled)
  return compiled


def _resume_or_start(ckpt, start_point, abstract, init, tx, state_sharding, workdir: str,
                     total: int):
  """(start step, data_from, train iterator, state, early-stopping progress): restored from the
  checkpoint to resume from (`_resume_point`), else fresh; then the assets are written."""
  config, data = start_point.config, start_point.data
  pidx, pcount = jax.process_index(), jax.process_count()
  start, data_from, same_layout = _resume_point(ckpt, config, abstract, pcount)
  train_iter = iter(pipeline.train_dataset(data, config, total, pidx, pcount, data_from))
  state, progress = (None, {}) if start is None else ckpt.restore(
      start, abstract, train_iter if same_layout else None)
  start = start or 0
  assets.write(workdir, config, data)
  state = _start_state(state, init, tx, state_sharding, start_point, workdir, start, progress)
  prog = {"early_stop": progress.get("early_stop", early_stopping.init_state()),
          "stopped_at": progress.get("stopped_at")}
  return start, data_from, train_iter, state, prog


def _start_state(restored, init, tx, state_sharding, start_point, workdir: str, start: int,
                 progress: dict):
  """The state the loop starts from: the restored one, re-materialised so that the donating
  step may consume it, or a fresh one with model.init's weights put in."""
  if restored is not None:
    _log(f"resumed from step {start} (epoch {progress.get('epoch', 0):.2f}) in "
         f"{os.path.abspath(os.path.join(workdir, 'checkpoints'))}")
    if pretrained.enabled(start_point.config):
      _log("model.init not applied: the run resumes from its own checkpoint (assets/"
           "init_report.json describes the weights it started from)")
      if jax.process_index() == 0:
        pretrained.note_resume(workdir, start)
    return jax.jit(lambda s: s, out_shardings=state_sharding)(restored)
  state = jax.jit(lambda: init(tx), out_shardings=state_sharding)()
  if start_point.init_weights is not None:
    loaded, report = start_point.init_weights
    state = state.replace(params=pretrained.place(state.params, loaded,
                                                  start_point.config.model.scan_blocks))
    if jax.process_index() == 0:
      pretrained.write_report(workdir, report)
      print(pretrained.summary(report), flush=True)
  return state


def _print_header(batch: int, data, mesh, state, total: int, spe: int, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  print(f"mFormerV1: {state_lib.count_params(state.params):,} parameters; {len(data.train)} "
        f"train / {len(data.val)} val rows; {total} steps ({spe} per epoch), batch "
        f"{batch} on {jax.device_count()} device(s); workdir {workdir}",
        flush=True)
  leaves = jax.tree.leaves(state)
  mib = lambda n: f"{n / 2**20:,.1f} MiB"
  print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}; train state "
        f"{mib(sum(x.nbytes for x in leaves))}, "
        f"{mib(sum(x.addressable_shards[0].data.nbytes for x in leaves))} per device, "
        f"{mib(sum(s.data.nbytes for x in leaves for s in x.addressable_shards))} in this "
        "process", flush=True)


def _check_finite(state, patience: int, step: int, saver: Saver) -> None:
  streak = int(jax.device_get(state.nonfinite_streak))
  if streak >= patience:
    raise FloatingPointError(
        f"loss or gradients non-finite for {streak} steps in a row at step {step}; updates were "
        f"skipped. {saver.last_good()}")


def _track_best(results, step, prog, es, es_mode, keep_top_n, saver, state, train_iter,
                last_val) -> bool:
  """Early stopping's bookkeeping after a validation: saves an improved state as a candidate
  for the best checkpoints (keep_top_n) and, when patience runs out, the last state; returns
  whether it saved."""
  value = early_stopping.lookup(results, es.metric)
  prog["early_stop"], improved = early_stopping.update(prog["early_stop"], value, step, es_mode,
                                                       es.min_delta)
  saved = False
  if improved and keep_top_n > 0:
    saver.save(state, train_iter, step, prog, last_val, value)
    saved = True
  if es.active and early_stopping.should_stop(prog["early_stop"], es.patience_evals):
    prog["stopped_at"] = step
    best = prog["early_stop"]
    _log(f"early stopping at step {step}: {es.metric} has not improved by {es.min_delta} for "
         f"{es.patience_evals} evaluations (best {best['best']:.4f} at step "
         f"{best['best_step']})")
    saver.save(state, train_iter, step, prog, last_val, provisional=False)
    saved = True
  return saved


def closing_lines(workdir: str, step: int, validated: bool) -> str:
  """What the run wrote and how to look at it: the last lines a person reads."""
  out = [f"done: step {step} in {workdir}: checkpoints/ (step {step}), metrics.jsonl, config.json,"
         f" assets/" + (f", eval/step_{step}.json (+ _per_class.csv), plots/" if validated
                        else "")]
  if (bad := images_lib.unreadable_images()):
    first = next(iter(bad.items()))
    out.append(f"  {len(bad)} image(s) were unreadable and left out or zeroed "
               f"(data.hybrid.missing_image_policy), first {first[0]}: {first[1]}")
  out.append(f"  TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
  out.append(f"  export: python -m linnaeus_jax.export --workdir={workdir} --out=BUNDLE_DIR")
  return "\n".join(out)
