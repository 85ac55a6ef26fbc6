"""One optimizer update, from small module-level functions (each tested on its own).

`make_train_step` reads top to bottom: schedule values at the step; per micro-batch
`micro_step` (`prepare_batch`: metadata masks and mixing, then the forward pass and
`losses_and_counts`); `accumulate_grads` over the micro-batches; `gradnorm_update`; and
`apply_update`, which skips the update on every device when the loss or gradients are not finite.
Every random draw comes from fold_in(seed key, step), so a resumed run repeats the uninterrupted
one. The functions take a `StepConfig`, the few static values they need, not the whole config.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from linnaeus_jax import config as config_lib
from linnaeus_jax import gradnorm, losses, masking, metrics, mixing, optim, preprocessing
from linnaeus_jax.data import augment


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static values of the train and eval steps (hashable; from `from_config`)."""
  tasks: tuple[str, ...]
  train_funcs: tuple[str, ...]
  val_funcs: tuple[str, ...]
  label_smoothing: float = 0.0
  null_class: bool = False  # data.partial.levels: class 0 is the null label
  mask_nulls: bool = False  # train.phase1_mask_null_loss: null labels never count
  argmax_targets: bool = False
  class_w_train: bool = False
  class_w_val: bool = False
  components: tuple[str, ...] = ()
  mix: mixing.MixConfig = mixing.MixConfig(False, False)
  erase: tuple = (0.0, (0.02, 1 / 3), (0.3, 3.3), "const")  # prob, area, aspect, mode
  accum: int = 1
  gradnorm: bool = False
  gn_alpha: float = 1.5
  gn_interval: int = 1
  gn_warmup: int = 0
  gn_zero_aux: bool = True
  gn_exclude: tuple[str, ...] = ()
  subsets: tuple[str, ...] = ()  # metrics.taxa_subsets names
  rarity_bins: int = 0
  image_mean: tuple[float, ...] | None = None  # data.image_mean/std; None: images in [0, 1]
  image_std: tuple[float, ...] | None = None

  @classmethod
  def from_config(cls, config) -> "StepConfig":
    gw, er = config.loss.grad_weighting, config.aug.random_erase
    mean, std = preprocessing.image_stats(config)
    return cls(
        tasks=tuple(config.data.task_keys_h5),
        train_funcs=tuple(config.loss.task_specific.train.funcs),
        val_funcs=tuple(config.loss.task_specific.val.funcs),
        label_smoothing=float(config.model.label_smoothing),
        null_class=bool(config.data.partial.levels),
        mask_nulls=bool(config.train.phase1_mask_null_loss),
        argmax_targets=bool(config.loss.argmax_targets),
        class_w_train=bool(gw["class"].train), class_w_val=bool(gw["class"].val),
        components=tuple(n for n, _ in config_lib.enabled_components(config)),
        mix=mixing.MixConfig.from_config(config),
        erase=(float(er.prob), tuple(er.area_range), tuple(er.aspect_ratio), er.mode),
        accum=int(config.train.accumulation_steps),
        gradnorm=gw.task.type == "gradnorm", gn_alpha=float(gw.task.alpha),
        gn_interval=int(gw.task.update_interval), gn_warmup=int(gw.task.warmup_steps),
        gn_zero_aux=bool(gw.task.zero_aux_info), gn_exclude=tuple(gw.task.exclude),
        subsets=tuple(s[0] for s in config.metrics.taxa_subsets),
        rarity_bins=len(config.metrics.rarity_percentiles) + 1,
        image_mean=mean, image_std=std)


class Prepared(NamedTuple):
  """A micro-batch as the model sees it, and how its targets are mixed."""
  image: jax.Array
  meta: dict
  meta_valid: jax.Array  # (B, components) after the scheduled masks (and mixing)
  mix: tuple  # (lam_B, partner_B), or (None, None) when not mixed
  masked_BxC: jax.Array  # what the masking schedule switched off
  mixed: jax.Array  # scalar bool: the batch was mixed


def prepare_batch(cfg: StepConfig, schedules, batch: dict, key, probs: dict) -> Prepared:
  """Pixels normalised (`cfg.image_mean/std`), scheduled metadata masks ANDed into the validity,
  selective mixing of partners, erasing."""
  k_mask, k_mix, k_erase = jax.random.split(key, 3)
  meta_valid, masked_BxC = masking.meta_masks(
      k_mask, batch["meta_valid"], probs["schedule/meta_mask_prob"],
      probs["schedule/partial_mask_prob"], schedules.combos_KxC, schedules.combo_weights)
  image = preprocessing.normalize(batch["image"], cfg.image_mean, cfg.image_std)
  meta = batch["meta"]
  mix, mixed = (None, None), jnp.zeros((), bool)
  if cfg.mix.active and schedules.mix.enabled:
    image, meta, meta_valid, lam_B, partner_B, mixed = mixing.mix_batch(
        k_mix, cfg.mix, probs["schedule/mix_prob"], image, meta, meta_valid, batch["pair_ok"])
    mix = (lam_B, partner_B)
  prob, area, aspect, mode = cfg.erase
  if prob > 0:
    image = augment.random_erasing(k_erase, image, prob, area, aspect, mode,
                                   batch["example_mask"])
  return Prepared(image, meta, meta_valid, mix, masked_BxC, mixed)


def losses_and_counts(cfg: StepConfig, logits: dict, batch: dict, consts: dict, *, train: bool,
                      mix=(None, None), null_keep=None, key=None):
  """({task: losses.TaskLoss}, metric counts) of a batch; the train and eval steps share it.

  Nulls are handled alike in both: masked in phase 1 (`mask_nulls`), else kept with the
  scheduled probability `null_keep` (train) or always (eval, `null_keep` None). Class weights
  apply where `class_w_train` / `class_w_val` say.
  """
  real_B = batch["example_mask"]
  per_task = losses.task_losses(
      logits, batch["labels"], cfg.tasks, cfg.train_funcs if train else cfg.val_funcs,
      smoothing=cfg.label_smoothing, null_class=cfg.null_class, mask_nulls=cfg.mask_nulls,
      example_mask_B=real_B, lam_B=mix[0], partner_B=mix[1], tax_matrices=consts.get("tax"),
      class_weights=consts.get("class_w") if (cfg.class_w_train if train else cfg.class_w_val)
      else None, null_keep_prob=null_keep, key=key, argmax_targets=cfg.argmax_targets)
  counts = metrics.batch_counts(logits, batch["labels"], per_task, real_B, cfg.tasks,
                                null_class=cfg.null_class, lca_CxC=consts.get("lca"))
  members = metrics.subset_membership(
      batch["labels"], cfg.tasks, cfg.subsets, consts.get("subset_task"),
      consts.get("subset_cls"), consts.get("rarity_bin"),
      cfg.rarity_bins if "rarity_bin" in consts else 0)
  counts.update(metrics.subset_counts(logits, batch["labels"], real_B, cfg.tasks, members))
  return per_task, counts


def forward_losses(graphdef, cfg: StepConfig, schedules, state, consts, probs, batch, key, params,
                   *, no_meta: bool = False, refine: bool = True):
  """(Prepared, {task: TaskLoss}, counts) of a micro-batch's training forward pass. The train
  loss and GradNorm's re-forward both come from here, so that with the same key they see the same
  masks, mixing, dropout and null coins."""
  k_prep, k_model = jax.random.split(key)
  k_drop, k_null = jax.random.split(k_model)
  prep = prepare_batch(cfg, schedules, batch, k_prep, probs)
  meta_valid = jnp.zeros_like(prep.meta_valid) if no_meta else prep.meta_valid
  logits = nnx.merge(graphdef, params, state.buffers)(
      prep.image, prep.meta, meta_valid, train=True, key=k_drop, refine=refine)
  per_task, counts = losses_and_counts(cfg, logits, batch, consts, train=True, mix=prep.mix,
                                       null_keep=probs["schedule/null_incl_prob"], key=k_null)
  return prep, per_task, counts


def micro_step(graphdef, cfg: StepConfig, schedules, state, consts, probs, batch, key):
  """(loss, grads, per-task losses (T,), sums to accumulate) of one micro-batch."""

  def loss_fn(params):
    prep, per_task, counts = forward_losses(graphdef, cfg, schedules, state, consts, probs, batch,
                                            key, params)
    loss = losses.total_loss(per_task, cfg.tasks, state.gradnorm["weights"])
    return loss, (jnp.stack([per_task[t].mean for t in cfg.tasks]), counts, prep)
  (loss, (task_T, counts, prep)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  real_B = batch["example_mask"]
  sums = {"counts": counts, "real": jnp.sum(real_B), "mixed": prep.mixed.astype(jnp.int32),
          "masked": {c: jnp.sum(prep.masked_BxC[:, i] & real_B)
                     for i, c in enumerate(cfg.components)}}
  return loss, grads, task_T, sums


def split_micro(x, k: int):
  """(B, ...) -> (k, B/k, ...) keeping each partner pair (2i, 2i+1) in one micro-batch and every
  micro-batch spread over all devices (rows are taken pair-strided, not in contiguous blocks)."""
  b = x.shape[0]
  x = x.reshape((b // (2 * k), k, 2) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((k, b // k) + x.shape[3:])


def first_micro(batch: dict, key, k: int):
  """(micro-batch 0, its key), as `accumulate_grads` hands them to its function."""
  if k == 1:
    return batch, key
  return jax.tree.map(lambda x: split_micro(x, k)[0], batch), jax.random.fold_in(key, 0)


def accumulate_grads(fn, batch: dict, key, k: int):
  """`fn(micro_batch, key)` -> (loss, grads, task_T, sums) over the `k` micro-batches of
  `batch` (micro-batch j with key fold_in(key, j); k = 1: `batch` and `key` as they are): loss,
  grads and task losses averaged, sums summed. One large batch's step, in k pieces of memory."""
  if k == 1:
    return fn(batch, key)
  micro = jax.tree.map(lambda x: split_micro(x, k), batch)

  def body(carry, xs):
    mb, j = xs
    return jax.tree.map(jnp.add, carry, fn(mb, jax.random.fold_in(key, j))), None
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      fn, jax.tree.map(lambda x: x[0], micro), key))
  (loss, grads, task_T, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
  return loss / k, jax.tree.map(lambda g: g / k, grads), task_T / k, sums


def gradnorm_update(graphdef, cfg: StepConfig, schedules, state, consts, probs, batch, key):
  """(GradNorm state, logged values) after the closed-form update on `batch` (the first
  micro-batch, with its key: the train loss's masks, mixing, dropout and null coins), re-forwarded
  without metadata (`zero_aux_info`) and without hierarchical refinement. Only on update steps:
  the re-forward runs under `lax.cond` (`gradnorm.maybe_update`)."""
  def task_means(params):
    _, per_task, _ = forward_losses(graphdef, cfg, schedules, state, consts, probs, batch, key,
                                    params, no_meta=cfg.gn_zero_aux, refine=False)
    return jnp.stack([per_task[t].mean for t in cfg.tasks])
  gn_state, info = gradnorm.maybe_update(
      state.gradnorm, state.step, task_means, state.params,
      gradnorm.shared_mask(state.params, cfg.gn_exclude), alpha=cfg.gn_alpha,
      update_interval=cfg.gn_interval, warmup_steps=cfg.gn_warmup)
  out = {f"gradnorm/{k}/{t}": info[k][i] for k in ("norm", "target", "ratio", "loss")
         for i, t in enumerate(cfg.tasks)}
  return gn_state, {**out, "gradnorm/updated": info["updated"]}


def apply_update(tx, state, grads, loss, gn_state):
  """(next state, gradient norm): the optimizer update, or, when the loss or the gradients are
  not finite, the same parameters, optimizer and GradNorm state with the skip counted."""
  grad_norm = optim.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return state.replace(
      params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
      gradnorm=keep(gn_state, state.gradnorm), step=state.step + 1,
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32)), grad_norm


def make_train_step(graphdef, tx, cfg: StepConfig, lrs: dict, schedules):
  """train_step(state, batch, consts) -> (state, out); `consts` from `state.loss_constants`,
  `lrs` each parameter group's LR schedule (`optim.build`). `out["acc"]` holds sums that the loop
  adds up between log steps; the rest is the step's own values."""

  def train_step(state, batch, consts):
    key = jax.random.fold_in(state.rng, state.step)
    probs = schedules.values(state.step)
    micro = lambda b, k: micro_step(graphdef, cfg, schedules, state, consts, probs, b, k)
    loss, grads, task_T, sums = accumulate_grads(micro, batch, key, cfg.accum)
    gn_state, gn_out = state.gradnorm, {}
    if cfg.gradnorm:
      first, first_key = first_micro(batch, key, cfg.accum)
      gn_state, gn_out = gradnorm_update(graphdef, cfg, schedules, state, consts, probs, first,
                                         first_key)
    new_state, grad_norm = apply_update(tx, state, grads, loss, gn_state)
    t = state.step
    out = {"loss": loss, "grad_norm": grad_norm, "lr": lrs["default"](t),
           **{f"lr/{g}": fn(t) for g, fn in lrs.items()}, **probs,
           **{f"loss/{task}": task_T[i] for i, task in enumerate(cfg.tasks)},
           **{f"gradnorm/weight/{task}": gn_state["weights"][i]
              for i, task in enumerate(cfg.tasks)},
           **gn_out, "nonfinite_skips": new_state.nonfinite_skips,
           "acc": {**sums, "steps": jnp.asarray(cfg.accum, jnp.int32)}}
    return new_state, out
  return train_step
