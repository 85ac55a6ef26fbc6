"""The training loop: data, state, jitted steps, validation, checkpoints and logs.

Sections: Setup (config resolved against the data) / State / Steps / Loop. One train step is one
optimizer update, `jax.jit`-ed over a `data` mesh with the state donated; every random draw comes
from fold_in(seed key, step), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from linnaeus_jax import checkpoint as ckpt_lib
from linnaeus_jax import config as config_lib
from linnaeus_jax import early_stopping, evaluate, gradnorm, losses, masking, metric_writers
from linnaeus_jax import metrics, mixing, models, optim, plots, preemption, preprocessing, sharding
from linnaeus_jax import schedules as schedules_lib
from linnaeus_jax import taxonomy as taxonomy_lib
from linnaeus_jax.data import labels as labels_lib
from linnaeus_jax.data import augment, pipeline, synthetic


# ----------------------------------------------------------------------------- Setup


def resolve(config: ml_collections.ConfigDict, num_devices: int = 1):
  """Validates `config`, loads the data and returns (resolved config, dataset).

  The resolved config has the synthetic dataset's paths and each head's `num_classes` as found
  in the data; it is what `config.json` records.
  """
  config = config_lib.load_overrides(config)
  config_lib.validate(config, num_devices)
  if config.data.synthetic.enabled and not config.data.h5.labels_path:
    s = config.data.synthetic
    make = lambda: synthetic.ensure(synthetic.SyntheticOptions(**s.options.to_dict()),
                                    s.cache_dir or None)
    if jax.process_count() > 1:  # process 0 generates, the others wait and read
      if jax.process_index() == 0:
        make()
      multihost_utils.sync_global_devices("synthetic dataset")
    paths = make()
    config.data.h5.labels_path = paths["labels_path"]
    if "images_dir" in paths:
      config.data.hybrid.use_hybrid = True
      config.data.hybrid.images_dir = paths["images_dir"]
    else:
      config.data.h5.images_path = paths["images_path"]
  data = labels_lib.load(config)
  problems = []
  for task in data.task_keys:
    head = config.model.classification.heads[task]
    if head.num_classes and head.num_classes != data.num_classes[task]:
      problems.append(f"model.classification.heads.{task}.num_classes is {head.num_classes} but "
                      f"the data has {data.num_classes[task]} classes")
    head.num_classes = data.num_classes[task]
  if problems:
    raise config_lib.ConfigError("Invalid config:\n  " + "\n  ".join(problems))
  return config, data


def write_assets(workdir: str, config, data: labels_lib.Dataset) -> None:
  """config.json and the dataset's assets (class maps, taxonomy, counts, split, missing images,
  and the image/metadata layout that inference reproduces)."""
  if jax.process_index() != 0:
    return
  data.write_assets(os.path.join(workdir, "assets"))
  with open(os.path.join(workdir, "assets", "preprocessing.json"), "w", encoding="utf-8") as f:
    json.dump(preprocessing.record(config), f, indent=1)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(config))
  if data.missing_images:
    path = config.data.hybrid.verify_images.report_path or os.path.join(
        workdir, "assets", "missing_images.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(data.missing_images, f, indent=1)


def write_plots(workdir: str, step: int, results: dict, confusion_CxC, data, writer) -> None:
  """DIR/plots/meta_ablation.png and the coarsest rank's confusion matrix, also to TensorBoard."""
  tasks, coarse = data.task_keys, data.task_keys[-1]
  names = {v: str(k) for k, v in data.class_to_idx[coarse].items()}
  images = {"meta_ablation": plots.meta_ablation(
      results, tasks, os.path.join(workdir, "plots", "meta_ablation.png"))}
  images[f"confusion/{coarse}"] = plots.confusion_matrix(
      confusion_CxC, [names.get(i, str(i)) for i in range(len(confusion_CxC))],
      os.path.join(workdir, "plots", f"confusion_{coarse}.png"), f"{coarse}, step {step}")
  for tag, image in images.items():
    writer.image(step, f"val/{tag}", image)


# ----------------------------------------------------------------------------- State


def create_state(config, parents=None):
  """(graphdef, init(tx)); state = {params, buffers, opt_state, gradnorm, step, rng,
  nonfinite_streak, nonfinite_skips}.

  `buffers` are the model's untrained constants (taxonomy matrices of hierarchical heads, from
  `parents`); the optimizer sees `params` only.
  """
  build = lambda: models.build(config, nnx.Rngs(config.misc.seed), parents)
  graphdef, _, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)

  def init(tx):
    _, params, buffers = nnx.split(build(), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    return {"params": params, "buffers": nnx.to_pure_dict(buffers),
            "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "gradnorm": gradnorm.init_state(len(config.data.task_keys_h5),
                                            list(config.loss.grad_weighting.task.init_weights)
                                            or None),
            "rng": jax.random.PRNGKey(config.misc.seed),
            "nonfinite_streak": jnp.zeros((), jnp.int32),
            "nonfinite_skips": jnp.zeros((), jnp.int32)}
  return graphdef, init


def abstract_state(init, tx, mesh, config):
  """(abstract state with shardings, sharding tree) of `init(tx)` on `mesh` (`sharding.py`)."""
  shapes = jax.eval_shape(lambda: init(tx))
  shardings = sharding.state_sharding(mesh, shapes, config.mesh.fsdp_min_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings), shardings


def restore_state(config, workdir: str, parents, mesh, step: int | None = None):
  """(step, state, graphdef, state sharding) of DIR's checkpoint at `step` (default: the
  latest), for evaluation and inference (no data iterator)."""
  tx, _ = optim.build(config, 1, 1)
  graphdef, init = create_state(config, parents)
  abstract, state_sharding = abstract_state(init, tx, mesh, config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    steps = list(ckpt.manager.all_steps())
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                              f"{ckpt.directory}; steps: {steps}")
    state, _ = ckpt.restore(step, abstract, None)
  finally:
    ckpt.close()
  return step, state, graphdef, state_sharding


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- Steps


def loss_constants(config, data: labels_lib.Dataset) -> dict:
  """Per-task constant arrays of the loss, passed to the step as an argument (not baked in).

  `tax`: taxonomy smoothing matrices (C, C) of the tasks that use TaxonomyAwareLabelSmoothing;
  `class_w`: class weights (C,) from the train counts when a method is set; `lca`: heights of
  the lowest common ancestors of the finest rank's classes (C, C), for mistake severity.
  """
  tasks = list(config.data.task_keys_h5)
  uses = [f == "TaxonomyAwareLabelSmoothing" for f in config.loss.task_specific.train.funcs]
  uses = [a or f == "TaxonomyAwareLabelSmoothing"
          for a, f in zip(uses, config.loss.task_specific.val.funcs)]
  ts = config.loss.taxonomy_smoothing
  enabled = [bool(e) or u for e, u in zip(list(ts.enabled) + [False] * len(tasks), uses)]
  partial = config.data.partial.levels
  out = {"lca": jnp.asarray(metrics.lca_heights(data.taxonomy, tasks[0], partial)),
         "rarity_bin": jnp.asarray(metrics.rarity_bins(
             np.bincount(data.train.labels[:, 0], minlength=data.num_classes[tasks[0]]),
             list(config.metrics.rarity_percentiles), partial))}
  subsets, problems = config.metrics.taxa_subsets, []
  for name, task, taxon in subsets:
    if task not in tasks or taxon not in data.class_to_idx[task]:
      problems.append(f"metrics.taxa_subsets: {name!r}: no taxon {taxon} in {task}")
  if problems:
    raise config_lib.ConfigError("Invalid config:\n  " + "\n  ".join(problems))
  if subsets:
    out["subset_task"] = jnp.asarray([tasks.index(t) for _, t, _ in subsets], jnp.int32)
    out["subset_cls"] = jnp.asarray([data.class_to_idx[t][x] for _, t, x in subsets], jnp.int32)
  if any(enabled):
    out["tax"] = {t: jnp.asarray(m) for t, m in taxonomy_lib.smoothing_matrices(
        data.taxonomy, enabled, ts.alpha, ts.beta, ts.uniform_roots, ts.fallback_to_uniform,
        null_class=config.data.partial.levels).items()}
  cw = config.loss.grad_weighting["class"]
  if cw.method != "none" and (cw.train or cw.val):
    out["class_w"] = {t: jnp.asarray(losses.class_weights(
        np.bincount(data.train.labels[:, j], minlength=data.num_classes[t]), cw.method,
        smoothing_factor=cw.smoothing_factor, cap=cw.cap, base=cw.base, log_base=cw.log_base))
        for j, t in enumerate(tasks)}
  return out


def split_micro(x, k: int):
  """(B, ...) -> (k, B/k, ...) keeping each partner pair (2i, 2i+1) in one micro-batch and every
  micro-batch spread over all devices (rows are taken pair-strided, not in contiguous blocks)."""
  b = x.shape[0]
  x = x.reshape((b // (2 * k), k, 2) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((k, b // k) + x.shape[3:])


def make_train_step(graphdef, tx, config, lrs: dict, scheds: schedules_lib.Schedules):
  """step(state, batch, consts) -> (state, out); `consts` from `loss_constants`, `lrs` the LR
  schedule of each parameter group (`optim.build`), logged as `lr/<group>` (`lr`: the default).

  One step is one optimizer update over `train.accumulation_steps` micro-batches of the batch
  (gradients and losses averaged over them, as the original). Per micro-batch, in order:
  schedule values at the step; metadata masks ANDed into the batch's validity; selective mixing
  of partners; forward, per-task losses with mixed targets, null inclusion and class weights,
  weighted by the task weights (GradNorm's, from the state). Then GradNorm's update every
  `update_interval` steps (on the first micro-batch) and the optimizer update, skipped on every
  device when the loss or gradients are not finite.
  """
  tasks = list(config.data.task_keys_h5)
  funcs = list(config.loss.task_specific.train.funcs)
  partial = config.data.partial.levels
  mix_cfg = mixing.MixConfig.from_config(config)
  comps = [n for n, _ in config_lib.enabled_components(config)]
  gw = config.loss.grad_weighting.task
  use_gradnorm = gw.type == "gradnorm"
  use_class_w = config.loss.grad_weighting["class"].train
  accum = config.train.accumulation_steps

  def prepare(batch, key, sched):
    """Masked validity, mixed images/metadata and the mixing of targets for one micro-batch."""
    k_mask, k_mix, k_erase = jax.random.split(key, 3)
    meta_valid, masked_BxC = masking.meta_masks(
        k_mask, batch["meta_valid"], sched["schedule/meta_mask_prob"],
        sched["schedule/partial_mask_prob"], scheds.combos_KxC, scheds.combo_weights)
    image, meta = preprocessing.normalize(batch["image"]), batch["meta"]
    mix, applied = (None, None), jnp.zeros((), bool)
    if mix_cfg.active and scheds.mix.enabled:
      image, meta, meta_valid, lam_B, partner_B, applied = mixing.mix_batch(
          k_mix, mix_cfg, sched["schedule/mix_prob"], image, meta, meta_valid, batch["pair_ok"])
      mix = (lam_B, partner_B)
    er = config.aug.random_erase
    if er.prob > 0:
      image = augment.random_erasing(k_erase, image, er.prob, tuple(er.area_range),
                                     tuple(er.aspect_ratio), er.mode, batch["example_mask"])
    return image, meta, meta_valid, mix, masked_BxC, applied

  def forward_losses(params, buffers, inputs, batch, consts, key, refine=True, null_keep=None):
    image, meta, meta_valid, (lam_B, partner_B) = inputs
    k_drop, k_null = jax.random.split(key)
    logits = nnx.merge(graphdef, params, buffers)(image, meta, meta_valid, train=True,
                                                  key=k_drop, refine=refine)
    per_task = losses.task_losses(
        logits, batch["labels"], tasks, funcs, smoothing=config.model.label_smoothing,
        partial_levels=partial, mask_nulls=config.train.phase1_mask_null_loss,
        example_mask_B=batch["example_mask"], lam_B=lam_B, partner_B=partner_B,
        tax_matrices=consts.get("tax"), class_weights=consts.get("class_w") if use_class_w
        else None, null_keep_prob=null_keep, key=k_null,
        argmax_targets=config.loss.argmax_targets)
    return logits, per_task

  def micro_step(state, batch, consts, key, sched):
    """(loss, grads, logged sums) of one micro-batch."""
    k_prep, k_model = jax.random.split(key)
    image, meta, meta_valid, mix, masked_BxC, applied = prepare(batch, k_prep, sched)

    def loss_fn(params):
      logits, per_task = forward_losses(params, state["buffers"], (image, meta, meta_valid, mix),
                                        batch, consts, k_model,
                                        null_keep=sched["schedule/null_incl_prob"])
      return losses.total_loss(per_task, tasks, state["gradnorm"]["weights"]), (per_task, logits)
    (loss, (per_task, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    real_B = batch["example_mask"]
    logged = {f"loss/{t}": per_task[t][0] for t in tasks}
    counts = metrics.batch_counts(logits, batch["labels"], per_task, real_B, tasks,
                                  partial_levels=partial, lca_CxC=consts.get("lca"))
    counts.update(metrics.subset_counts(logits, batch["labels"], real_B, tasks,
                                        metrics.subset_members(config, batch["labels"], consts)))
    logged.update(  # sums, accumulated between log steps:
        counts=counts,
        masked={c: jnp.sum(masked_BxC[:, i] & real_B) for i, c in enumerate(comps)},
        real=jnp.sum(real_B), mixed=applied.astype(jnp.int32))
    return loss, grads, logged

  def gradnorm_update(state, batch, consts, key, sched):
    """The closed-form update from a re-forward of the micro-batch, without metadata
    (`zero_aux_info`) and without hierarchical refinement; nulls excluded. The re-forward,
    input preparation included, runs only on update steps (under `lax.cond`)."""
    k_prep, _ = jax.random.split(key)

    def task_means(params):
      image, meta, meta_valid, mix, _, _ = prepare(batch, k_prep, sched)  # as micro_step drew
      if gw.zero_aux_info:
        meta_valid = jnp.zeros_like(meta_valid)
      _, pt = forward_losses(params, state["buffers"], (image, meta, meta_valid, mix), batch,
                             consts, key, refine=False)
      return jnp.stack([pt[t][0] for t in tasks])
    gn_state, info = gradnorm.maybe_update(
        state["gradnorm"], state["step"], task_means, state["params"],
        gradnorm.shared_mask(state["params"], tuple(gw.exclude)), alpha=gw.alpha,
        update_interval=gw.update_interval, warmup_steps=gw.warmup_steps)
    out = {f"gradnorm/{k}/{t}": info[k][i] for k in ("norm", "target", "ratio", "loss")
           for i, t in enumerate(tasks)}
    return gn_state, {**out, "gradnorm/updated": info["updated"]}

  def step(state, batch, consts):
    t = state["step"]
    key = jax.random.fold_in(state["rng"], t)
    sched = scheds.values(t)
    if accum == 1:
      loss, grads, logged = micro_step(state, batch, consts, key, sched)
      first = batch
    else:
      micro = jax.tree.map(lambda x: split_micro(x, accum), batch)

      def body(carry, xs):
        mb, j = xs
        loss, grads, logged = micro_step(state, mb, consts, jax.random.fold_in(key, j), sched)
        return jax.tree.map(jnp.add, carry, (loss, grads, logged)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: micro_step(state, jax.tree.map(lambda x: x[0], micro), consts, key, sched)))
      (loss, grads, logged), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
      logged.update({f"loss/{t_}": logged[f"loss/{t_}"] / accum for t_ in tasks})
      first, key = jax.tree.map(lambda x: x[0], micro), jax.random.fold_in(key, 0)
    gn_state, gn_out = state["gradnorm"], {}
    if use_gradnorm:
      gn_state, gn_out = gradnorm_update(state, first, consts, key, sched)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {"params": keep(params, state["params"]), "buffers": state["buffers"],
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "gradnorm": keep(gn_state, state["gradnorm"]),
                 "step": t + 1, "rng": state["rng"],
                 "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
                 "nonfinite_skips": state["nonfinite_skips"] + (~finite).astype(jnp.int32)}
    acc = {k: logged.pop(k) for k in ("counts", "masked", "real", "mixed")}
    acc["steps"] = jnp.asarray(accum, jnp.int32)  # micro-batches, for the mixed fraction
    out = {"loss": loss, "grad_norm": grad_norm, "lr": lrs["default"](t),
           **{f"lr/{g}": fn(t) for g, fn in lrs.items()}, **sched, **logged,
           **{f"gradnorm/weight/{t_}": gn_state["weights"][i] for i, t_ in enumerate(tasks)},
           **gn_out, "nonfinite_skips": new_state["nonfinite_skips"],
           "acc": acc}  # summed between log steps (see `run`)
    return new_state, out
  return step


# ----------------------------------------------------------------------------- Loop


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _every(interval: int, step: int) -> bool:
  return interval > 0 and step % interval == 0


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last validation metrics.

  SIGTERM ends the run after the current step with a checkpoint (`preemption.py`); rerunning
  resumes from the latest checkpoint.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config)
  config, data = resolve(config, jax.device_count())
  sharding.check_process_rows(mesh, config.data.batch_size)
  write_assets(workdir, config, data)
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
  consts = loss_constants(config, data)

  graphdef, init = create_state(config, data.taxonomy.parents)
  repl = sharding.replicated(mesh)
  abstract, state_sharding = abstract_state(init, tx, mesh, config)
  train_ds = pipeline.train_dataset(data, config, total, pidx, pcount)
  train_iter = iter(train_ds)
  es = config.train.early_stop
  es_mode = early_stopping.direction(es.metric, es.mode)
  track_best = es.active or sched.checkpoint.keep_top_n > 0
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               sched.checkpoint.keep_last_n,
                               keep_top_n=sched.checkpoint.keep_top_n, best_mode=es_mode)
  prog = {"early_stop": early_stopping.init_state(), "stopped_at": None}
  start = ckpt.latest_step()
  if start is not None and not config.train.auto_resume:
    ckpt.close()
    raise FileExistsError(f"{workdir} already holds checkpoints (latest step {start}) and "
                          "resuming is off (--resume=false / train.auto_resume=False); refusing "
                          "to overwrite them: use a new --workdir")
  if start is not None:
    saved_by = ckpt.progress(start).get("process_count", pcount)
    if saved_by != pcount:
      ckpt.close()
      raise ValueError(f"the checkpoint at step {start} in {ckpt.directory} was written by "
                       f"{saved_by} processes, this run has {pcount}: each process's data "
                       "position is saved for its own slice, so resume with the same number")
    state, progress = ckpt.restore(start, abstract, train_iter)
    prog.update({k: progress[k] for k in prog if k in progress})
    # Re-materialise restored arrays so that the donating step may consume them.
    state = jax.jit(lambda s: s, out_shardings=state_sharding)(state)
    _log(f"resumed from step {start} (epoch {progress.get('epoch', 0):.2f}) in {ckpt.directory}")
  else:
    state = jax.jit(lambda: init(tx), out_shardings=state_sharding)()
    start = 0
  n_params = count_params(state["params"])

  train_step = jax.jit(make_train_step(graphdef, tx, config, lrs, scheds),
                       in_shardings=(state_sharding, sharding.batch_sharding(mesh), repl),
                       out_shardings=(state_sharding, repl), donate_argnums=(0,))
  end = total if prog["stopped_at"] is None else prog["stopped_at"]
  # Records past the checkpoint (a run killed after it) are dropped: they are about to be redone.
  writer = metric_writers.MetricWriter(workdir, resume_step=start,
                                       redo_eval_at_resume=start == end)
  if pidx == 0:
    print(f"mFormerV1: {n_params:,} parameters; {len(data.train)} train / {len(data.val)} val "
          f"rows; {total} steps ({spe} per epoch), batch {config.data.batch_size} on "
          f"{jax.device_count()} device(s); workdir {workdir}", flush=True)
    leaves = jax.tree.leaves(state)
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}; train state "
          f"{mib(sum(x.nbytes for x in leaves))}, "
          f"{mib(sum(x.addressable_shards[0].data.nbytes for x in leaves))} per device", flush=True)

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
      eval_steps[plist] = evaluate.jit_step(graphdef, config, plist, state_sharding, mesh)
    t0, confusion = time.time(), {}
    results = evaluate.run(eval_steps[plist], (state["params"], state["buffers"]), ds, mesh,
                           tasks, consts, confusion)
    if pidx == 0:
      progress_bar.newline()
      print(f"[validation step {step}, {time.time() - t0:.1f} s] top-1 per rank:", flush=True)
    for phase, result in results.items():
      result["duration_sec"] = time.time() - t0
      writer.write(step, phase, result)
      if pidx == 0:
        accs = "  ".join(f"{result[f'acc1/{t}']:6.1f}" for t in tasks)
        print(f"  {phase:<28} loss {result['loss']:.4f}  {accs}", flush=True)
    if final and pidx == 0:
      write_plots(workdir, step, results, confusion["val"], data, writer)
    return results

  config_record = json.loads(config_lib.to_json(config))

  def save(step, metric=None):
    ckpt.save(step, state, train_iter, {"step": step, "epoch": step / spe, "total_steps": total,
                                        "process_count": pcount, **prog, "last_val": last_val,
                                        "config": config_record}, metric)

  progress_bar = metric_writers.Progress(total, start, config.data.batch_size)
  last_val, acc_sum = {}, None
  t_last, s_last = time.time(), start
  log_every = sched.metrics.tensorboard_interval
  preempt = preemption.Watch()
  try:
    for step in range(start, end):
      batch = sharding.global_batch(next(train_iter), mesh)
      state, out = train_step(state, batch, consts)
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
        if int(state["nonfinite_streak"]) >= config.train.nonfinite_patience:
          raise FloatingPointError(
              f"loss or gradients non-finite for {int(state['nonfinite_streak'])} steps in a row "
              f"at step {done}; updates were skipped. The last good checkpoint "
              f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}.")
        if _every(sched.metrics.console_interval, done) or done == total:
          progress_bar.update(done, train_m["loss"])
      saved = False
      if done != total and (_every(val_every, done) or _every(mask_every, done)
                            or _every(partial_every, done)):
        results = validate(done)
        last_val = results["val"]
        if track_best:
          value = early_stopping.lookup(results, es.metric)
          prog["early_stop"], improved = early_stopping.update(prog["early_stop"], value, done,
                                                               es_mode, es.min_delta)
          if improved and sched.checkpoint.keep_top_n > 0:
            save(done, value)  # a candidate for the best checkpoints
            saved = True
          if es.active and early_stopping.should_stop(prog["early_stop"], es.patience):
            prog["stopped_at"] = done
            best = prog["early_stop"]
            _log(f"early stopping at step {done}: {es.metric} has not improved by "
                 f"{es.min_delta} for {es.patience} evaluations (best {best['best']:.4f} at "
                 f"step {best['best_step']})")
            save(done)
            break
      if _every(ckpt_every, done) and done != total and not saved:
        save(done)
        saved = True
      if preempt.reached(done) and done != total:
        if not saved:
          save(done)
        ckpt.wait()
        _log(f"\nSIGTERM: saved the checkpoint at step {done} in {ckpt.directory}; exiting. "
             "Rerun the same command to resume.")
        return last_val
    end = total if prog["stopped_at"] is None else prog["stopped_at"]
    if ckpt.latest_step() != end:
      save(end)
    elif pidx == 0 and start == end:
      print(f"Training already finished at step {end}; running the final validation.")
    last_val = validate(end, final=True)["val"]
  finally:
    preempt.close()
    ckpt.close()  # waits for the asynchronous saves
    writer.close()
  return last_val
