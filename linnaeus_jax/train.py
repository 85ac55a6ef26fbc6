"""The training loop: data, state, the jitted steps, validation, checkpoints and logs.

One train step (`train_step.py`) is one optimizer update, `jax.jit`-ed over the device mesh with
the state donated; the state and its setup live in `state.py`, validation in `evaluate.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from linnaeus_jax import checkpoint as ckpt_lib
from linnaeus_jax import config as config_lib
from linnaeus_jax import early_stopping, evaluate, hardware, memory, metric_writers, metrics, optim
from linnaeus_jax import plots, preemption, pretrained, sharding, train_step, workdir_lock
from linnaeus_jax import schedules as schedules_lib
from linnaeus_jax import state as state_lib
from linnaeus_jax.data import images as images_lib
from linnaeus_jax.data import pipeline


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


# ----------------------------------------------------------------------------- Loop


def _last_good(ckpt) -> str:
  """Names the newest confirmed checkpoint, the one a rerun resumes from."""
  ckpt.wait()
  good = [s for s in ckpt.steps() if s not in ckpt.provisional]
  if not good:
    return f"No checkpoint was saved before this (none in {ckpt.directory}): a rerun starts over."
  return f"The last good checkpoint (step {good[-1]}) is kept in {ckpt.directory}."


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _every(interval: int, step: int) -> bool:
  return interval > 0 and step % interval == 0


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last validation metrics.

  SIGTERM ends the run after the current step with a checkpoint (`preemption.py`); rerunning
  resumes from the latest checkpoint. One run at a time per workdir (`workdir_lock.py`).
  """
  mesh = sharding.make_mesh(config)
  config, data = state_lib.resolve(config, jax.device_count())
  steps = ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints"))
  config.misc.auto_choices = tuple(_resolve_auto(config, data, mesh, workdir, bool(steps)))
  _check_same_batch(config, workdir, steps)
  sharding.check_process_rows(mesh, config.data.batch_size)
  if steps and not config.train.auto_resume:
    raise FileExistsError(f"{workdir} already holds checkpoints (latest step {steps[-1]}) and "
                          "resuming is off (--resume=false / train.auto_resume=False); refusing "
                          "to overwrite them: use a new --workdir")
  init_weights = None
  if pretrained.enabled(config):  # read and checked before the workdir is touched
    # Normalisation follows the sources that loaded (a resumed run: those of its first start).
    if not steps:  # else the run resumes: its own checkpoint wins over model.init
      init_weights = pretrained.load(config, data.class_to_idx)
      report = init_weights[1]
    else:
      report = pretrained.read_report(workdir)
    loaded = None if report is None else pretrained.loaded_sources(report)
    note = pretrained.match_normalization(config, loaded)
    if init_weights is not None:
      init_weights[1]["normalization"] = note
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)  # only once the config and the data are known good
  try:
    with workdir_lock.acquire(workdir), contextlib.ExitStack() as cleanup:
      # cleanup: checkpoints, logs, signals
      return _train(config, data, mesh, workdir, cleanup, init_weights)
  except Exception:
    if created and jax.process_index() == 0 and not _has_results(workdir):
      shutil.rmtree(workdir)  # failed before a checkpoint or a metric (a batch too big, bad data)
    raise


def _has_results(workdir: str) -> bool:
  """Whether a run left anything worth keeping: a checkpoint or a metrics record."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  return bool(ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints"))) or (
      os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0)


def _check_same_batch(config, workdir: str, steps: list[int]) -> None:
  """A run resumes with the global batch its checkpoints were trained with (the train order
  and the step count depend on it); checked before anything is compiled or written."""
  path = os.path.join(workdir, "config.json")
  if steps and os.path.exists(path):
    batch = config_lib.read_json(path).data.batch_size
    if batch != config.data.batch_size:
      raise ValueError(f"the checkpoints in {workdir} (latest step {steps[-1]}) were trained with "
                       f"data.batch_size={batch}, this run has {config.data.batch_size}: the "
                       "train order and the step count depend on it, so resume with the same "
                       "global batch")


def _resolve_auto(config, data, mesh, workdir: str, resuming: bool) -> list[str]:
  """Sets the 'auto' settings (hardware.py; data.batch_size: memory.py, or the resumed run's
  own batch, which its data position depends on); prints and returns what each became."""
  notes = hardware.resolve(config)
  path = os.path.join(workdir, "config.json")
  if config.data.batch_size == "auto" and resuming and os.path.exists(path):
    config.data.batch_size = config_lib.read_json(path).data.batch_size
    notes.append(f"data.batch_size=auto -> {config.data.batch_size}, the batch of the run "
                 "being resumed")
  elif config.data.batch_size == "auto":
    _log("data.batch_size=auto: compiling the train step at a few batches for their memory")
    notes += memory.resolve_batch(config, mesh, state_lib.loss_constants(config, data),
                                  pipeline.padding_record(data, config), data.taxonomy.parents)
    config_lib.validate(config, jax.device_count())
  for note in notes:
    _log(f"auto: {note}")
  return notes


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


def _train(config, data, mesh, workdir: str, cleanup: contextlib.ExitStack,
           init_weights=None) -> dict:
  """`run` once the config and the data (and model.init's weights) are known good."""
  pidx, pcount = jax.process_index(), jax.process_count()
  tasks = list(config.data.task_keys_h5)
  _log(f"data: {data.summary()}")

  spe = pipeline.steps_per_epoch(pipeline.train_groups(data, config), config.data.batch_size)
  total = config_lib.total_steps(config, spe)
  sched = config.schedule
  vs = sched.validation
  mask_every = config_lib.resolve_steps(vs.mask_meta_interval_steps,
                                        vs.mask_meta_interval_fraction,
                                        vs.mask_meta_interval_epochs, total, spe)
  pm = vs.partial_mask_meta
  partial_every = config_lib.resolve_steps(pm.interval_steps, pm.interval_fraction,
                                           pm.interval_epochs, total, spe) if pm.enabled else 0
  val_every = config_lib.resolve_steps(vs.interval_steps, vs.interval_fraction,
                                       vs.interval_epochs, total, spe)
  ckpt_every = config_lib.resolve_steps(sched.checkpoint.interval_steps,
                                        sched.checkpoint.interval_fraction,
                                        sched.checkpoint.interval_epochs, total, spe)
  tx, lrs = optim.build(config, total, spe)
  scheds = schedules_lib.Schedules.from_config(config, total, spe)
  consts = state_lib.loss_constants(config, data)
  step_cfg = train_step.StepConfig.from_config(config)

  graphdef, init = state_lib.create_state(config, data.taxonomy.parents)
  repl = sharding.replicated(mesh)
  abstract, state_sharding = state_lib.abstract_state(init, tx, mesh, config)
  # Compiled before any state or checkpoint exists, so that a batch too big for the device
  # stops here, with the numbers.
  batch_sharding = sharding.batch_sharding(mesh)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      (config.data.batch_size,) + np.shape(x), np.asarray(x).dtype, sharding=batch_sharding),
                      pipeline.padding_record(data, config))
  step_fn = jax.jit(train_step.make_train_step(graphdef, tx, step_cfg, lrs, scheds),
                    in_shardings=(state_sharding, batch_sharding, repl),
                    out_shardings=(state_sharding, repl),
                    donate_argnums=(0,)).lower(abstract, spec, consts).compile()
  memory.check_memory(step_fn)

  es = config.train.early_stop
  es_mode = early_stopping.direction(es.metric, es.mode)
  track_best = es.active or sched.checkpoint.keep_top_n > 0
  ckpt = cleanup.enter_context(ckpt_lib.Checkpointer(  # closing waits for asynchronous saves
      os.path.join(workdir, "checkpoints"), sched.checkpoint.keep_last_n,
      keep_top_n=sched.checkpoint.keep_top_n, best_mode=es_mode))
  prog = {"early_stop": early_stopping.init_state(), "stopped_at": None}
  start, data_from, same_layout = _resume_point(ckpt, config, abstract, pcount)
  train_iter = iter(pipeline.train_dataset(data, config, total, pidx, pcount, data_from))
  state, progress = None, {}
  if start is not None:
    state, progress = ckpt.restore(start, abstract, train_iter if same_layout else None)
  start = start or 0
  state_lib.write_assets(workdir, config, data)
  if state is not None:
    prog.update({k: progress[k] for k in prog if k in progress})
    # Re-materialise restored arrays so that the donating step may consume them.
    state = jax.jit(lambda s: s, out_shardings=state_sharding)(state)
    _log(f"resumed from step {start} (epoch {progress.get('epoch', 0):.2f}) in {ckpt.directory}")
    if pretrained.enabled(config):
      _log("model.init not applied: the run resumes from its own checkpoint (assets/"
           "init_report.json describes the weights it started from)")
      if pidx == 0:
        pretrained.note_resume(workdir, start)
  else:
    state = jax.jit(lambda: init(tx), out_shardings=state_sharding)()
    if init_weights is not None:
      loaded, report = init_weights
      state = state.replace(params=pretrained.place(state.params, loaded,
                                                    config.model.scan_blocks))
      if pidx == 0:
        pretrained.write_report(workdir, report)
        print(pretrained.summary(report), flush=True)
  finite_fn = jax.jit(state_lib.is_finite)
  n_params = state_lib.count_params(state.params)
  end = total if prog["stopped_at"] is None else prog["stopped_at"]
  # Records past the checkpoint (a run killed after it) are dropped: they are about to be redone.
  config_record = json.loads(config_lib.to_json(config))
  writer = metric_writers.MetricWriter(
      workdir, resume_step=start, redo_eval_at_resume=start == end,
      wandb_config=config.logging.wandb, run_config=config_record)
  cleanup.callback(writer.close)
  if pidx == 0:
    print(f"mFormerV1: {n_params:,} parameters; {len(data.train)} train / {len(data.val)} val "
          f"rows; {total} steps ({spe} per epoch), batch {config.data.batch_size} on "
          f"{jax.device_count()} device(s); workdir {workdir}", flush=True)
    leaves = jax.tree.leaves(state)
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}; train state "
          f"{mib(sum(x.nbytes for x in leaves))}, "
          f"{mib(sum(x.addressable_shards[0].data.nbytes for x in leaves))} per device, "
          f"{mib(sum(s.data.nbytes for x in leaves for s in x.addressable_shards))} in this "
          "process", flush=True)

  eval_steps = {}  # one compiled eval step per set of phases

  def validate(step, final=False):
    """Every validation phase due at `step` in one pass over the data: {phase: metrics}."""
    ds = pipeline.eval_dataset(data, config, pidx, pcount)
    if ds is None:
      return {}
    plist = evaluate.phases(
        config, mask_meta=final or _every(mask_every, step),
        partial=partial_every > 0 and (final or _every(partial_every, step)),
        exhaustive=final and vs.final_epoch.exhaustive_partial_meta_validation)
    if plist not in eval_steps:
      eval_steps[plist] = evaluate.jit_step(graphdef, step_cfg, plist, state_sharding, mesh)
    t0, confusion, class_counts = time.time(), {}, {}
    results = evaluate.run(eval_steps[plist], (state.params, state.buffers), ds, mesh, tasks,
                           consts, confusion, task_weights=state.gradnorm["weights"],
                           class_counts=class_counts)
    for phase, result in results.items():
      result["duration_sec"] = time.time() - t0
      writer.write(step, phase, result)
    if pidx == 0:
      progress_bar.newline()
      print(f"[validation step {step}, {time.time() - t0:.1f} s] top-1 (%) per rank:\n"
            + "\n".join(evaluate.results_table(results, tasks)), flush=True)
    if final and pidx == 0:
      rows = evaluate.per_class_rows(class_counts["val"], data)
      evaluate.write_eval(workdir, step, results, rows)
      worst = evaluate.worst_summary(rows)
      print(evaluate.WORST_HEADER + "\n" + "\n".join(worst), flush=True)
      writer.text(step, "val/worst_classes", "\n\n".join(w.strip() for w in worst))
      write_plots(workdir, step, results, confusion["val"], data, writer, rows)
    return results


  def save(step, metric=None, provisional=True):
    """Checkpoints a finite state (else warns and keeps the last good one); a provisional one
    is confirmed by a finite next step, or deleted."""
    if not bool(finite_fn(state)):
      _log(f"\nstep {step}: no checkpoint: the train state or its last step is not finite. "
           f"{_last_good(ckpt)}")
      return
    ckpt.save(step, state, train_iter, {"step": step, "epoch": step / spe, "total_steps": total,
                                        "process_count": pcount, "data_from": data_from, **prog,
                                        "last_val": last_val, "config": config_record},
              metric, provisional)

  progress_bar = metric_writers.Progress(total, start, config.data.batch_size)
  last_val, acc_sum = {}, None
  t_last, s_last = time.time(), start
  log_every = sched.metrics.tensorboard_interval
  preempt = preemption.Watch()
  cleanup.callback(preempt.close)
  for step in range(start, end):
    batch = sharding.global_batch(next(train_iter), mesh)
    state, out = step_fn(state, batch, consts)
    if ckpt.provisional:  # the step after a save: did its state give a finite step?
      if int(state.nonfinite_streak) == 0:
        ckpt.confirm()
      else:
        _log(f"\ncheckpoint(s) {ckpt.discard()} deleted: step {step + 1} after them was "
             f"non-finite. {_last_good(ckpt)}")
    acc = out.pop("acc")
    acc_sum = acc if acc_sum is None else jax.tree.map(jnp.add, acc_sum, acc)  # no host sync
    done = step + 1
    if _every(log_every, done) or _every(sched.metrics.console_interval, done) or done == total:
      out, acc_sum = jax.device_get(out), jax.device_get(acc_sum)
      train_m = {k: float(v) for k, v in out.items()}
      # Accuracies etc. over every sample since the last log (the losses are the step's own).
      train_m.update({k: v for k, v in metrics.finalize(
          {k: float(v) for k, v in acc_sum["counts"].items()}, tasks).items()
                      if not k.startswith("loss") and k != "num_examples"})
      # Measured since the last log: the fraction of samples whose component the schedule
      # masked, and of batches that were mixed.
      train_m.update({f"meta_masking/masked_frac/{c}": float(v) / max(int(acc_sum["real"]), 1)
                      for c, v in acc_sum["masked"].items()})
      train_m["mix/mixed_batch_frac"] = float(acc_sum["mixed"]) / max(int(acc_sum["steps"]), 1)
      acc_sum = None
      now = time.time()
      train_m["img_per_sec"] = (done - s_last) * config.data.batch_size / max(now - t_last, 1e-9)
      t_last, s_last = now, done
      train_m["epoch"] = done / spe
      if _every(log_every, done):
        writer.write(done, "train", train_m)
      # Checked where the step's outputs are fetched anyway (log steps): no per-step sync.
      if int(state.nonfinite_streak) >= config.train.nonfinite_patience:
        raise FloatingPointError(
            f"loss or gradients non-finite for {int(state.nonfinite_streak)} steps in a row "
            f"at step {done}; updates were skipped. {_last_good(ckpt)}")
      if _every(sched.metrics.console_interval, done) or done == total:
        progress_bar.update(done, train_m["loss"])
    saved = False
    if done != total and (_every(val_every, done) or _every(mask_every, done)
                          or _every(partial_every, done)):
      results = validate(done)
      last_val = results.get("val", {})
      if track_best:
        value = early_stopping.lookup(results, es.metric)
        prog["early_stop"], improved = early_stopping.update(prog["early_stop"], value, done,
                                                             es_mode, es.min_delta)
        if improved and sched.checkpoint.keep_top_n > 0:
          save(done, value)  # a candidate for the best checkpoints
          saved = True
        if es.active and early_stopping.should_stop(prog["early_stop"], es.patience_evals):
          prog["stopped_at"] = done
          best = prog["early_stop"]
          _log(f"early stopping at step {done}: {es.metric} has not improved by "
               f"{es.min_delta} for {es.patience_evals} evaluations (best {best['best']:.4f} at "
               f"step {best['best_step']})")
          save(done, provisional=False)
          break
    if _every(ckpt_every, done) and done != total and not saved:
      save(done)
      saved = True
    if preempt.reached(done) and done != total:
      if not saved:
        save(done, provisional=False)
      ckpt.wait()
      _log(f"\nSIGTERM: saved the checkpoint at step {done} in {ckpt.directory}; exiting. "
           "Rerun the same command to resume.")
      raise preemption.Preempted(done)
  end = total if prog["stopped_at"] is None else prog["stopped_at"]
  if ckpt.latest_step() != end:
    save(end, provisional=False)
  elif pidx == 0 and start == end:
    print(f"Training already finished at step {end}; running the final validation.")
  last_val = validate(end, final=True).get("val", {})
  if pidx == 0:
    print(closing_lines(workdir, end, bool(last_val)), flush=True)
  return last_val


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
