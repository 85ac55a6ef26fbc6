"""The config schema, its validation and its resolution against the data.

Key paths are the original's YACS paths lower-cased with the same nesting
(`DATA.H5.LABELS_PATH` -> `config.data.h5.labels_path`); names that are data keep their case
(task keys such as `taxa_L10`, components `TEMPORAL`). `base_config()` holds every known key with
the original's defaults; files in `configs/` start from it. Beside it, the rules as data:
DURATIONS (every `<name>_steps | _fraction | _epochs` group, with its default), CHOICES (allowed
values) and RANGES (numeric intervals); the rules between keys are the section checks of
CHECKS. `validate()` lists every unknown key and every problem in one error.

Every key can be set on the command line (`--config.data.batch_size=32`): sequences are tuples,
which ml_collections parses from Python literals (`--config.data.task_keys_h5="('taxa_L10',
'taxa_L20')"`, nested for whitelists). New entries of the open subtrees (`OPEN_SUBTREES`) need a
config file. Nothing here imports jax, so that checking a config is cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re

import ml_collections
from ml_collections import config_dict

from linnaeus_jax import param_filters

TASK_KEYS = ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40")
HEAD_TYPES = ("Linear", "HierarchicalSoftmax", "ConditionalClassifier")
ROUTINGS = ("soft", "hard", "gumbel")
REMAT = ("none", "full", "dots")
LR_SCHEDULES = ("cosine", "linear", "step", "wsd", "constant")
DECAY_TYPES = ("cosine", "linear")  # lr_scheduler.decay_type (wsd's decay)
OPTIMIZERS = ("adamw", "sgd", "muon", "ademamix")
LOSSES = ("CrossEntropyLoss", "LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy",
          "TaxonomyAwareLabelSmoothing")
CLASS_WEIGHTS = ("none", "smoothing", "capping", "exponential", "logarithmic")
TASK_WEIGHTING = ("static", "gradnorm")
# aug.autoaug.policy: one of AUTOAUG_POLICIES or RandAugment 'rand-m<M>-n<N>' (data/augment.py).
AUTOAUG_POLICIES = ("none", "original")
RANDAUG = re.compile(r"rand-m(\d+(?:\.\d+)?)-n(\d+)")
ERASE_MODES = ("pixel", "rand", "const")  # aug.random_erase.mode
# Subtrees whose keys are data (task keys, component names): any key may appear there, but each
# entry must have the shape of the template.
OPEN_SUBTREES = {"model.classification.heads": "head", "data.meta.components": "component",
                 "optimizer.parameter_groups.groups": "param_group"}


class ConfigError(ValueError):
  """A config problem; the message lists every problem found."""


def _int_or_auto(value):
  """A field that takes an int or 'auto' (from a file or `--config.x=auto`)."""
  return config_dict.FieldReference(value, field_type=object)


def _int_or_auto_problem(key: str, value, minimum: int) -> str | None:
  if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                         and value >= minimum):
    return None
  return f"{key} must be an integer >= {minimum} or 'auto', got {value!r}"


def _component(enabled, source, dim, idx):
  return dict(enabled=enabled, source=source, columns=(), dim=dim, idx=idx, allow_missing=True,
              oor_mask=False)


def head_template():
  # routing_strategy / temperature: ConditionalClassifier only (soft | hard | gumbel).
  return ml_collections.ConfigDict(dict(type="Linear", num_classes=0, routing_strategy="soft",
                                        temperature=1.0))


def component_template():
  return ml_collections.ConfigDict(_component(False, "", 1, 0))


def param_group_template(**values):
  """A parameter group entry (docs/optimization.md) with every key, so that each one can be
  overridden on the command line. filter / decay: filter strings (linnaeus_jax/param_filters.py);
  optimizer '' and weight_decay < 0 inherit optimizer.name / optimizer.weight_decay."""
  group = ml_collections.ConfigDict(dict(filter="", optimizer="", weight_decay=-1.0,
                                         lr_multiplier=1.0, decay="decayable"))
  for key, value in values.items():
    if key not in group:
      raise ConfigError(f"unknown parameter group key {key!r} (keys: {list(group.keys())})")
    group[key] = value
  return group


TEMPLATES = {"head": head_template, "component": component_template,
             "param_group": param_group_template}


def param_group_values(node) -> dict:
  """A parameter group's entry with the template's values for the keys it leaves out."""
  return {**param_group_template().to_dict(), **node.to_dict()}


# mFormerV1 sizes (docs/model.md); only the first two ConvNeXt depths are used.
MFORMER_V1_SIZES = {
    "sm": dict(dims=(96, 192, 384, 768), rope_depths=(5, 2), heads=(6, 12), drop_path=0.2),
    "md": dict(dims=(96, 192, 384, 768), rope_depths=(10, 2), heads=(6, 12), drop_path=0.3),
    "lg": dict(dims=(192, 384, 768, 1536), rope_depths=(10, 2), heads=(12, 24), drop_path=0.4),
    "xl": dict(dims=(256, 512, 1024, 2048), rope_depths=(22, 2), heads=(16, 32), drop_path=0.5),
}


def set_model_size(config: ml_collections.ConfigDict, size: str) -> None:
  """Sets config.model to the mFormerV1 size `size` (sm, md, lg, xl)."""
  s, m = MFORMER_V1_SIZES[size], config.model
  m.convnext_stages.depths = (3, 3)
  m.convnext_stages.dims = s["dims"]
  m.rope_stages.depths = s["rope_depths"]
  m.rope_stages.dims = s["dims"][2:]
  m.rope_stages.num_heads = s["heads"]
  m.rope_stages.mlp_ratio = (4.0, 4.0)
  m.drop_path_rate = s["drop_path"]


def _data_schema(c: ml_collections.ConfigDict) -> None:
  """Sets the data and its input pipeline."""
  c.data = dict(
      # images_path, train_/val_images_path: an images.h5 of decoded (N, H, W, 3) arrays, or a
      # shard set of encoded images (data/shards.py) as a glob '/data/images-*.h5' and/or
      # comma-separated paths; rows aligned with the labels file's.
      h5=dict(labels_path="", images_path="", train_labels_path="", val_labels_path="",
              train_images_path="", val_images_path="", train_val_split_ratio=0.9,
              train_val_split_seed=42),
      hybrid=dict(use_hybrid=False, images_dir="", file_extension=".jpg",
                  # Ours (the original's ALLOW_MISSING_IMAGES).
                  missing_image_policy="error",
                  verify_images=dict(enabled=False, max_missing_ratio=1.0, max_missing_count=-1,
                                     num_workers=8, decode=False, report_path="")),
      sampler=dict(type="grouped"),  # grouped: pairs for mixing
      taxonomy=dict(path="", multi_parent="error"),  # ours: taxonomy_tree.json
      task_keys_h5=TASK_KEYS,
      partial=dict(levels=False),
      out_of_region=dict(include=True),
      upward_major_check=False,
      meta=dict(active=True, components=dict(
          TEMPORAL=_component(True, "temporal", 2, 0),
          SPATIAL=_component(True, "spatial", 3, 1),
          ELEVATION=_component(False, "elevation_broadrange_2", 10, 2))),
      img_size=384,
      # Global batch (all devices of all processes), or 'auto': the largest that fits the
      # devices' memory with batch_size_headroom of it left free (memory.py).
      batch_size=_int_or_auto(64),
      batch_size_headroom=0.1,
      batch_size_val=128,
      # Ours: per-channel (x - mean) / std after scaling to [0, 1]; () keeps [0, 1] (the
      # original). model.init.match_normalization fills them from a pretrained source.
      image_mean=(), image_std=(),
      # Grain worker processes (0: decode in the main process) and reading threads (per
      # process); 'auto': sized from the host's cores (hardware.py).
      num_workers=_int_or_auto("auto"),
      prefetch_threads=_int_or_auto("auto"),
      # Ours: the built-in synthetic dataset, generated into the cache on first use.
      synthetic=dict(enabled=False, cache_dir="", options=dict(
          num_orders=2, families_per_order=2, genera_per_family=3, species_per_genus=4,
          img_size=64, max_samples_per_species=200, min_samples_per_species=40,
          zipf_exponent=0.5, null_species_rate=0.04, null_genus_rate=0.02,
          missing_temporal_rate=0.05, missing_spatial_rate=0.05, missing_elevation_rate=0.05,
          out_of_region_rate=0.05, temporal_hours=False, image_format="jpeg", seed=0,
          pixel_confusion=0.0, metadata_spread=1.0, label_noise_rate=0.0)),
  )


def _model_schema(c: ml_collections.ConfigDict) -> None:
  """Sets the model and its initial weights."""
  c.model = dict(
      name="mFormerV1",
      in_chans=3,
      convnext_stages=dict(depths=(3, 3), dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
      rope_stages=dict(depths=(5, 2), dims=(384, 768), num_heads=(6, 12), mlp_ratio=(4.0, 4.0),
                       rope_theta=10000.0, rope_mixed=True,
                       norm_eps=1e-5),  # ours: the blocks' LayerNorm eps (RoPE-ViT uses 1e-6)
      drop_rate=0.0,
      drop_path_rate=0.2,
      only_last_cls=False,
      label_smoothing=0.1,
      # Ours (docs/design.md#model): compatibility switches and precision.
      rope_mode="rotate",  # cos_only: the original's defect, for converted checkpoints only
      attn_scale="rsqrt_head_dim",  # inv_head_dim: the original's flash path
      meta_missing="learned_token",  # zeros: the original
      # 'auto' (hardware.py): cuDNN's fused attention on NVIDIA GPUs where it runs, else XLA.
      attention_impl="auto",
      dtype="auto",  # compute dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); params f32
      scan_blocks=True,  # identical blocks of a stage under nnx.scan (one compiled block)
      remat="none",  # recompute block activations in the backward pass: full | dots
      depthwise_impl="shift",  # shift: fused shifted sums; conv: grouped lax.conv
      classification=dict(heads={k: head_template().to_dict() for k in TASK_KEYS}),
      # Ours (docs/finetuning.md): initial weights. convnext / ropevit: ImageNet checkpoints
      # stitched into the ConvNeXt and RoPE stages; checkpoint: an earlier model (a workdir,
      # `DIR:step`, a bundle, a converted or an original checkpoint). allow_partial: report
      # unknown keys and mismatched shapes instead of failing. match_normalization: take the
      # source's input mean/std when data.image_mean is ().
      init=dict(convnext="", ropevit="", checkpoint="", allow_partial=False,
                match_normalization=True),
  )


def _optimization_schema(c: ml_collections.ConfigDict) -> None:
  """Sets training length, optimizer and learning rate."""
  c.train = dict(
      epochs=300.0,
      steps=0,  # optimizer updates; when > 0 it overrides epochs
      clip_grad=5.0,
      auto_resume=True,
      # ours: resume from this checkpoint step instead of the latest, when the later ones are
      # damaged (they are moved to DIR/checkpoints_set_aside); -1: the latest
      resume_step=-1,
      phase1_mask_null_loss=False,
      nonfinite_patience=5,  # ours: stop after this many non-finite (skipped) steps in a row
      accumulation_steps=1,  # micro-batches of data.batch_size / k per optimizer update
      # Stop when `metric` ('<phase>/<name>', e.g. val/loss, val/acc1/taxa_L10) has not improved
      # by min_delta for `patience_evals` validations in a row; mode min | max | auto (min for
      # losses). The same metric ranks checkpoints for schedule.checkpoint.keep_top_n.
      early_stop=dict(active=False, metric="val/loss", mode="auto", patience_evals=5,
                      min_delta=0.0),
      # Ours: jax.transfer_guard level of the train loop; the tests run it at 'disallow', so
      # that a host sync the loop does not write explicitly fails.
      transfer_guard="allow",
  )
  # docs/optimization.md. name: the optimizer of every group that names none.
  c.optimizer = dict(
      name="adamw", eps=1e-8, weight_decay=0.05,
      betas=(0.9, 0.999, 0.9999),  # adamw: betas[:2]; ademamix: all three
      momentum=0.9,  # sgd (always nesterov)
      alpha=5.0, t_alpha_beta3=0,  # ademamix; t_alpha_beta3 > 0: alpha / beta3 warmup (steps)
      # muon: Muon on 2-D and conv (4-D) parameters per block, AdamW on the rest of its group
      # and on those matching adamw_filter (the original's single-optimizer exclusions).
      muon=dict(momentum=0.95, nesterov=True, ns_steps=5,
                adamw_filter="startswith:head/ or contains:token or contains:embed"),
      # First matching filter (in `order`) wins; the rest goes to `default`. Groups live in
      # `groups.<name>` (param_group_template()); '' / negative values inherit optimizer.*.
      # Ours (docs/finetuning.md): parameters matching `freeze` (a filter) get no updates and no
      # optimizer state; layer_decay < 1 scales each layer's updates by
      # layer_decay ** (layers + 1 - layer id) (timm/BEiT; stem 0, blocks 1.., heads last).
      freeze="", layer_decay=1.0,
      parameter_groups=dict(enabled=False, order=(), groups={},
                            default=dict(optimizer="", weight_decay=-1.0, lr_multiplier=1.0,
                                         decay="decayable")),
  )
  c.lr_scheduler = dict(
      name="cosine",  # measured from the warmup end
      base_lr=1e-4, warmup_lr=5e-7, min_lr=1e-5,
      warmup_steps=0, warmup_fraction=0.0, warmup_epochs=0.0,  # DURATIONS: 5 epochs
      decay_steps=5000, decay_rate=0.1,  # step: x decay_rate every decay_steps
      stable_duration_fraction=0.8, decay_duration_fraction=0.1,  # wsd, of the post-warmup steps
      decay_type="cosine",  # wsd's decay
      # LR, warmup_lr and min_lr x data.batch_size / reference_bs (the original always scaled,
      # but only its first step took effect).
      scale_by_batch=False, reference_bs=512)


def _dynamics_schema(c: ml_collections.ConfigDict) -> None:
  """Sets losses, task weighting and the scheduled training dynamics."""
  c.loss = dict(
      task_specific=dict(train=dict(funcs=("CrossEntropyLoss",) * 4),
                         val=dict(funcs=("CrossEntropyLoss",) * 4)),
      # Per-task switch (task_keys_h5 order) for TaxonomyAwareLabelSmoothing's matrices.
      taxonomy_smoothing=dict(enabled=(False,) * 4, alpha=0.1, beta=1.0, uniform_roots=True,
                              fallback_to_uniform=True),
      grad_weighting=dict(
          # type 'static': init_weights (or ones); 'gradnorm': the original's closed-form rule
          # (docs/training.md#losses). The original defaults to gradnorm; we default to static.
          task=dict(type="static", init_weights=(), alpha=1.5, update_interval=100,
                    warmup_steps=0, exclude=("head", "meta_"), zero_aux_info=True),
          # class weights from the train counts, applied once per sample
          # (docs/design.md#class-weights-applied-once).
          **{"class": dict(train=True, val=False, method="none", smoothing_factor=0.1,
                           cap=20.0, base=2.0, log_base=10.0)}),
      argmax_targets=False,  # True: argmax mixed targets as the original's criteria did
  )
  c.schedule = dict(
      # Every `<name>_steps | _fraction | _epochs` here is a duration of DURATIONS: all unset
      # (0), at most one set, the table's default when none is.
      # Ramps p(step) = start -> end, linear until the end. Full metadata masking ends at 30% of
      # training (the original gave no end and fell back to 5000 steps).
      meta_masking=dict(
          enabled=True, start_prob=1.0, end_prob=0.0, end_steps=0, end_fraction=0.0,
          # Partial masking: active in [start, end); its probability ramps from step 0 to
          # prob_end; each masked sample gets one whitelist combination, drawn by weights.
          partial=dict(enabled=False, start_steps=0, start_fraction=0.0, end_steps=0,
                       end_fraction=0.0, start_prob=0.01, end_prob=0.7, prob_end_steps=0,
                       prob_end_fraction=0.0, whitelist=(), weights=())),
      # Probability of keeping a null label's loss (per task, per sample); disabled = 1.
      null_masking=dict(enabled=False, start_prob=0.0, end_prob=1.0, end_steps=0,
                        end_fraction=0.0),
      # Intervals (default: every epoch); `interval_fraction=1.0`: only at the end.
      # Validation passes (docs/evaluation.md): `val` (metadata as given), `val_mask_meta` (all
      # components masked), one `val_mask_<A>_<B>` per partial_mask_meta.whitelist entry, and at
      # the end the exhaustive passes over every non-empty proper subset of the components.
      validation=dict(
          interval_steps=0, interval_fraction=0.0, interval_epochs=0.0,
          mask_meta_interval_steps=0, mask_meta_interval_fraction=0.0,
          mask_meta_interval_epochs=0.0,
          partial_mask_meta=dict(enabled=False, interval_steps=0, interval_fraction=0.0,
                                 interval_epochs=0.0, whitelist=()),
          final_epoch=dict(exhaustive_partial_meta_validation=False,
                           exhaustive_meta_components=())),  # () = every enabled component
      checkpoint=dict(interval_steps=0, interval_fraction=0.0, interval_epochs=0.0,
                      keep_last_n=2, keep_top_n=0),
      metrics=dict(console_interval=100, tensorboard_interval=50),
      # Selective mixing of the sampler's partners (same group at group_levels[0]). Off by
      # default: the original's default (constant 0.2, tested twice) mixed 4% of batches.
      mix=dict(group_levels=("taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"), min_group_size=4,
               exclude_null_samples=False, null_task_keys=(),
               prob=dict(enabled=False, start_prob=1.0, end_prob=0.2, end_steps=0,
                         end_fraction=0.0),
               switch_prob=0.5,  # CutMix instead of Mixup when both are enabled
               mixup=dict(enabled=True, alpha=1.0),
               cutmix=dict(enabled=False, alpha=1.0, minmax=()),
               meta_mix="pick"),  # docs/training.md
  )


def _run_schema(c: ml_collections.ConfigDict) -> None:
  """Sets augmentation, metrics, logging and the device mesh."""
  c.aug = dict(autoaug=dict(policy="original"),  # or 'none', 'rand-m<M>-n<N>'
               random_erase=dict(prob=0.25, mode="pixel", area_range=(0.02, 0.4),
                                 aspect_ratio=(0.3, 3.3), count=1))
  # Per-subset top-1 (`subset_acc1/<name>/<task>`): taxa subsets as (name, task key, taxon id),
  # and rarity bins of the finest rank's classes by percentiles of the train class counts.
  c.metrics = dict(taxa_subsets=(), rarity_percentiles=(1, 5, 25, 50, 75, 90, 95, 99))
  # auto_choices: ours, filled by training: what each 'auto' setting became, and why.
  c.misc = dict(seed=42, auto_choices=())
  # Ours (docs/training.md#weights--biases): mirror TensorBoard's scalars and plots to a W&B run
  # (pip install -e '.[wandb]'). mode: '' (W&B's default, WANDB_MODE), 'online' or 'offline'.
  # profile_steps: (start, stop) writes a profile of those train steps that TensorBoard's
  # Profile tab opens (DIR/tensorboard/plugins/profile); () none.
  c.logging = dict(wandb=dict(enabled=False, project="linnaeus_jax", entity="", name="",
                              mode="", tags=()), profile_steps=())
  # docs/distributed.md. data x fsdp = all devices (of all processes); data=-1: the rest. fsdp > 1
  # splits every state array of >= fsdp_min_size elements along its largest divisible dimension.
  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**14)


def base_config() -> ml_collections.ConfigDict:
  """Every known key, with the original's defaults where it has one (sequences as tuples)."""
  c = ml_collections.ConfigDict()
  for section in (_data_schema, _model_schema, _optimization_schema, _dynamics_schema,
                  _run_schema):
    section(c)
  return c


# ----------------------------------------------------------------------------- Rules


UNITS = ("steps", "fraction", "epochs")
RAMP_UNITS = ("steps", "fraction")  # a ramp ends at a step or at a fraction of training


@dataclasses.dataclass(frozen=True)
class Duration:
  """A duration named once: its members are `<name>_<unit>`, one per unit. A member is set when
  > 0; at most one may be; with none set the duration is `default` ((unit, value)), or unset."""
  units: tuple[str, ...] = UNITS
  default: tuple[str, float] | None = None


# Every duration of the schema, with its default (docs/training.md#durations). Unset without a
# default: a partial-masking window from step 0; no ramp end (an error if the ramp changes).
DURATIONS = {
    "lr_scheduler.warmup": Duration(default=("epochs", 5.0)),
    "schedule.meta_masking.end": Duration(RAMP_UNITS, ("fraction", 0.3)),
    "schedule.meta_masking.partial.start": Duration(RAMP_UNITS),
    "schedule.meta_masking.partial.end": Duration(RAMP_UNITS),
    "schedule.meta_masking.partial.prob_end": Duration(RAMP_UNITS, ("fraction", 0.5)),
    "schedule.null_masking.end": Duration(RAMP_UNITS),
    "schedule.mix.prob.end": Duration(RAMP_UNITS),
    "schedule.validation.interval": Duration(default=("epochs", 1.0)),
    "schedule.validation.mask_meta_interval": Duration(default=("epochs", 1.0)),
    "schedule.validation.partial_mask_meta.interval": Duration(default=("epochs", 1.0)),
    "schedule.checkpoint.interval": Duration(default=("epochs", 1.0)),
}
# Probability ramps (docs/training.md#schedules): node -> the duration that ends them.
RAMPS = {"schedule.meta_masking": "end", "schedule.meta_masking.partial": "prob_end",
         "schedule.null_masking": "end", "schedule.mix.prob": "end"}

# Allowed values. `*`: every entry of an open subtree; `[]`: every element of a sequence.
CHOICES = {
    "data.hybrid.missing_image_policy": ("error", "skip", "placeholder"),
    "data.sampler.type": ("grouped", "standard"),
    "data.taxonomy.multi_parent": ("error", "majority"),
    "model.rope_mode": ("rotate", "cos_only"),
    "model.attn_scale": ("rsqrt_head_dim", "inv_head_dim"),
    "model.meta_missing": ("learned_token", "zeros"),
    "model.attention_impl": ("auto", "xla", "cudnn"),
    "model.remat": REMAT,
    "model.depthwise_impl": ("shift", "conv"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.classification.heads.*.type": HEAD_TYPES,
    "model.classification.heads.*.routing_strategy": ROUTINGS,  # ConditionalClassifier
    "optimizer.name": OPTIMIZERS,
    "lr_scheduler.name": LR_SCHEDULES,
    "lr_scheduler.decay_type": DECAY_TYPES,
    "loss.task_specific.*.funcs[]": LOSSES,
    "loss.grad_weighting.task.type": TASK_WEIGHTING,
    "loss.grad_weighting.class.method": CLASS_WEIGHTS,
    "train.early_stop.mode": ("auto", "min", "max"),
    "schedule.mix.meta_mix": ("pick", "prefer_valid"),
    "aug.random_erase.mode": ERASE_MODES,
    "logging.wandb.mode": ("", "online", "offline"),
    "train.transfer_guard": ("allow", "log", "disallow", "log_explicit", "disallow_explicit"),
}

# Numeric ranges as intervals ('inf' for no bound), or (interval, what the bound means).
RANGES = {
    "data.batch_size_headroom": "[0, 1)",
    "data.h5.train_val_split_ratio": "(0, 1]",
    "aug.random_erase.prob": "[0, 1]",
    "model.in_chans": "[1, inf)",
    "model.drop_rate": "[0, 1)",
    "model.drop_path_rate": "[0, 1)",
    "model.label_smoothing": "[0, 1)",
    "model.rope_stages.norm_eps": "(0, 1)",
    "model.classification.heads.*.temperature": "(0, inf)",
    "optimizer.momentum": "[0, 1)",
    "optimizer.weight_decay": "[0, inf)",
    "optimizer.layer_decay": "(0, 1]",
    "optimizer.muon.ns_steps": "[1, inf)",
    "lr_scheduler.base_lr": "(0, inf)",
    "lr_scheduler.warmup_lr": "[0, inf)",
    "lr_scheduler.min_lr": "[0, inf)",
    "train.steps": ("[0, inf)", "0: train.epochs counts"),
    "train.epochs": ("[0, inf)", "0: unused; train.steps counts"),
    "train.resume_step": ("[-1, inf)", "a checkpoint step, or -1: the latest"),
    "train.nonfinite_patience": "[1, inf)",
    "train.accumulation_steps": "[1, inf)",
    "train.early_stop.patience_evals": ("[1, inf)", "validations"),
    "loss.grad_weighting.task.update_interval": "[1, inf)",
    "schedule.checkpoint.keep_last_n": "[1, inf)",
    "schedule.checkpoint.keep_top_n": "[0, inf)",
    "schedule.metrics.console_interval": "[1, inf)",
    "schedule.metrics.tensorboard_interval": "[1, inf)",
    "schedule.mix.mixup.alpha": "(0, inf)",
    "schedule.mix.cutmix.alpha": "(0, inf)",
}
_INTERVAL = re.compile(r"([\[(])(-?[\d.]+), (-?[\d.]+|inf)([\])])")


def lookup(config, path: str):
  """The value at the dotted `path` of `config`."""
  for key in path.split("."):
    config = config[key]
  return config


def matches(config, pattern: str) -> list[tuple[str, object]]:
  """(key, value) of every key matching `pattern` (`*`: every entry); absent keys are skipped."""
  found = [("", config)]
  for part in pattern.split("."):
    found = [(f"{path}.{k}" if path else k, node[k]) for path, node in found
             if isinstance(node, ml_collections.ConfigDict)
             for k in (node.keys() if part == "*" else (part,)) if k in node]
  return found


def _choice_problems(config) -> list[str]:
  """A problem for every value (or sequence element) that CHOICES does not allow."""
  problems = []
  for pattern, allowed in CHOICES.items():
    each = pattern.endswith("[]")
    for key, value in matches(config, pattern.removesuffix("[]")):
      if each:
        problems += [f"{key}: {v!r} not in {allowed}" for v in value if v not in allowed]
      elif value not in allowed:
        problems.append(f"{key} {value!r} not in {allowed}")
  return problems


def range_problem(key: str, value, interval: str, note: str = "") -> str | None:
  """None if `value` is a number in `interval` (e.g. '[0, 1)', '(0, inf)'), else the problem."""
  left, low, high, right = _INTERVAL.fullmatch(interval).groups()
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    above = value >= float(low) if left == "[" else value > float(low)
    if above and (value <= float(high) if right == "]" else value < float(high)):
      return None
  bound = f"in {interval}" if high != "inf" else f"{'>=' if left == '[' else '>'} {low}"
  return f"{key} must be {bound}{f' ({note})' if note else ''}, got {value!r}"


def _range_problems(config) -> list[str]:
  """A problem for every value outside its interval of RANGES."""
  specs = {k: (v,) if isinstance(v, str) else v for k, v in RANGES.items()}
  return [p for pattern, spec in specs.items() for key, value in matches(config, pattern)
          if (p := range_problem(key, value, *spec))]


# ----------------------------------------------------------------------------- Durations


def resolve_steps(steps: int, fraction: float, epochs: float, total_steps: int,
                  steps_per_epoch: int) -> int:
  """A duration in steps from its members, each unset when <= 0 and at most one set: `steps`,
  `fraction` of total_steps or `epochs` x steps_per_epoch (at least 1); 0 when none is set
  (docs/design.md#one-duration-rule). Config durations: `resolve_duration`."""
  given = [(u, v) for u, v in zip(UNITS, (steps, fraction, epochs)) if v > 0]
  if len(given) > 1:
    raise ConfigError(_several_set([f"{u}={v!r}" for u, v in given]))
  if not given:
    return 0
  unit, value = given[0]
  return max(1, int(value) if unit == "steps" else round(
      value * (total_steps if unit == "fraction" else steps_per_epoch)))


def _members(config, name: str) -> list[tuple[str, float]]:
  """(unit, value) of the members of the duration `name` that are set (> 0)."""
  parent, prefix = name.rsplit(".", 1)
  node = lookup(config, parent)
  return [(u, node[f"{prefix}_{u}"]) for u in DURATIONS[name].units if node[f"{prefix}_{u}"] > 0]


def _several_set(keys: list[str]) -> str:
  listed = " and ".join([", ".join(keys[:-1]), keys[-1]])
  return f"{listed} are {'both' if len(keys) == 2 else 'all'} set: set one (0 unsets)"


def _duration_problem(config, name: str) -> str | None:
  given = _members(config, name)
  return _several_set([f"{name}_{u}={v!r}" for u, v in given]) if len(given) > 1 else None


def duration(config, name: str) -> tuple[str, float] | None:
  """(unit, value) of the duration `name` (a key of DURATIONS): the member set, else the
  table's default; None when neither. ConfigError naming them when several are set."""
  if (problem := _duration_problem(config, name)):
    raise ConfigError(problem)
  given = _members(config, name)
  return given[0] if given else DURATIONS[name].default


def resolve_duration(config, name: str, total_steps: int, steps_per_epoch: int) -> int:
  """The duration `name` (e.g. 'schedule.validation.interval') in steps; 0 when unset."""
  unit, value = duration(config, name) or ("steps", 0)
  members = {u: 0 for u in UNITS} | {unit: value}
  return resolve_steps(**members, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def _set_defaults(config) -> None:
  """Sets the default member of every duration that has none set (in place)."""
  for name, spec in DURATIONS.items():
    if spec.default and not _members(config, name):
      parent, prefix = name.rsplit(".", 1)
      lookup(config, parent)[f"{prefix}_{spec.default[0]}"] = spec.default[1]


def _keep_first_members(config) -> None:
  """A config.json written before the one-member rule: of several members set, keeps the one
  its precedence used (steps > fraction > epochs) and unsets the others (in place)."""
  for name in DURATIONS:
    parent, prefix = name.rsplit(".", 1)
    node = lookup(config, parent)
    for unit, value in _members(config, name)[1:]:
      node[f"{prefix}_{unit}"] = type(value)(0)


# ----------------------------------------------------------------------------- Loading


def sibling(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file `name` in `config_file`'s folder: config files that
  build on another (configs/inat21.py on sm.py) call it with their `__file__`."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns base_config() updated with `config`, so absent keys get their defaults, and each
  duration with no member set its DURATIONS default (so that config.json records them).

  The entries of an open subtree are data: `config`'s replace the defaults' (each completed from
  its template), so that e.g. a run with two heads does not get the four default ones back.
  """
  merged = base_config()
  _merge(merged, config)
  _set_defaults(merged)
  return merged


def with_changes(config, changes: dict) -> ml_collections.ConfigDict:
  """A complete copy of `config` (frozen or not) with the dotted keys of `changes` set, e.g.
  `with_changes(c, {"model.scan_blocks": False})`; `config` itself is left as it is."""
  out = with_defaults(ml_collections.ConfigDict(config.to_dict()))
  for path, value in changes.items():
    *parents, key = path.split(".")
    node = out
    for name in parents:
      node = node[name]
    with node.unlocked():
      node[key] = tuples(value)
  return out


def freeze(config) -> ml_collections.FrozenConfigDict:
  """The resolved config that training, evaluation and inference receive: read-only, so that
  nothing after resolution can change what config.json records."""
  return ml_collections.FrozenConfigDict(config)


def tuples(value):
  """`value` with every list (at any depth) as a tuple, the type command-line overrides need."""
  if isinstance(value, dict):
    return {k: tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(tuples(v) for v in value)
  return value


def _merge(dst, src, prefix=""):
  for key, value in src.items():
    path = prefix + key
    if path in OPEN_SUBTREES and isinstance(value, ml_collections.ConfigDict):
      entries = ml_collections.ConfigDict()
      for name, entry in value.items():
        if isinstance(entry, ml_collections.ConfigDict):  # else left for validate() to report
          entry, given = TEMPLATES[OPEN_SUBTREES[path]](), entry
          _merge(entry, given, f"{path}.{name}.")
        entries[name] = entry
      with dst.unlocked():
        dst[key] = entries
    elif isinstance(value, ml_collections.ConfigDict) and key in dst and isinstance(
        dst[key], ml_collections.ConfigDict):
      _merge(dst[key], value, path + ".")
    else:
      with dst.unlocked():
        dst[key] = tuples(value)


def _unknown(path: str, key: str, known) -> str:
  """`unknown key <path>.<key>`, with the closest known key if one is close."""
  hint = difflib.get_close_matches(key, list(known), n=1)
  prefix = path + "." if path else ""
  return f"unknown key {prefix}{key}" + (f" (did you mean {prefix}{hint[0]}?)" if hint else "")


def override_problem(config, path: str) -> str | None:
  """Why `--config.<path>=...` cannot set `config` (None if it can): an unknown key (with the
  closest known one), or a new entry of an open subtree, which only a config file can add."""
  node, done = config, ""
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{done} is a value ({type(node).__name__}), it has no key {key!r}"
    if key not in node:
      if done in OPEN_SUBTREES:
        kind = OPEN_SUBTREES[done]
        return (f"{done} has no entry {key!r}, and new entries cannot be added on the command "
                f"line: add it in a config file (e.g. a copy of configs/mformer.py): "
                f"`c.{done}.{key} = config_lib.{kind}_template()`, then set its keys")
      return _unknown(done, key, node.keys())
    node, done = node[key], f"{done}.{key}" if done else key
  return None


def _unknown_keys(node, ref, path, problems):
  for key in node.keys():
    full = f"{path}.{key}" if path else key
    if full in OPEN_SUBTREES:
      template = TEMPLATES[OPEN_SUBTREES[full]]()
      for name, entry in node[key].items():
        if not isinstance(entry, ml_collections.ConfigDict):
          problems.append(f"{full}.{name} must be a dict like {template.to_dict()}")
          continue
        _unknown_keys(entry, template, f"{full}.{name}", problems)
      continue
    if key not in ref:
      problems.append(_unknown(path, key, ref.keys()))
      continue
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(
        ref[key], ml_collections.ConfigDict):
      _unknown_keys(node[key], ref[key], full, problems)


def enabled_components(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """Enabled metadata components sorted by idx (the packing order), [] if meta is inactive."""
  if not config.data.meta.active:
    return []
  comps = [(n, c) for n, c in config.data.meta.components.items() if c.enabled and c.idx >= 0]
  return sorted(comps, key=lambda nc: nc[1].idx)


def task_level(task_key: str) -> float:
  """`taxa_L33_5` -> 33.5 (the original parsed it as 335)."""
  if "_L" not in task_key:
    raise ConfigError(f"task key {task_key!r} has no _L<level> suffix")
  return float(task_key.split("_L", 1)[1].replace("_", "."))


# ----------------------------------------------------------------------------- Validation


@dataclasses.dataclass(frozen=True)
class _Env:
  """What the section checks need besides the config."""
  num_devices: int
  need_data: bool
  tasks: list[str]
  auto_batch: bool  # data.batch_size is 'auto' (or not an int, which is reported)


def validate(config, num_devices: int = 1, need_data: bool = True) -> None:
  """Raises ConfigError listing every unknown key and inconsistent value: the tables (CHOICES,
  RANGES, DURATIONS) first, then each section's rules between keys.

  `need_data=False` accepts a config without a data source (e.g. to build the model alone).
  """
  problems: list[str] = []
  _unknown_keys(config, base_config(), "", problems)
  if not problems:  # value checks would only add noise about misspelled keys
    env = _Env(num_devices, need_data, list(config.data.task_keys_h5),
               not isinstance(config.data.batch_size, int))
    problems += _choice_problems(config) + _range_problems(config)
    problems += [p for name in DURATIONS if (p := _duration_problem(config, name))]
    for check in CHECKS:
      problems += check(config, env)
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def autoaug_policy_problem(policy: str) -> str | None:
  """None if `policy` is a valid aug.autoaug.policy, else the problem."""
  if policy in AUTOAUG_POLICIES or RANDAUG.fullmatch(policy):
    return None
  return f"aug.autoaug.policy {policy!r}: expected 'none', 'original' or 'rand-m<M>-n<N>'"


def _length_problem(key: str, values, tasks) -> list[str]:
  if len(values) == len(tasks):
    return []
  return [f"{key} has {len(values)} entries for {len(tasks)} tasks"]


def _task_problems(config, env) -> list[str]:
  """Task keys, and what has one entry per task (heads, losses, task weights)."""
  problems, tasks = [], env.tasks
  try:
    levels = [task_level(k) for k in tasks]
    if any(b <= a for a, b in zip(levels, levels[1:])):
      problems.append(f"data.task_keys_h5 must be strictly ascending in level, finest first: "
                      f"{tasks}")
  except ConfigError as e:
    problems.append(str(e))
  if not tasks:
    problems.append("data.task_keys_h5 is empty")
  heads = sorted(config.model.classification.heads.keys())
  if heads != sorted(tasks):
    problems.append(f"model.classification.heads has {heads} but data.task_keys_h5 is {tasks}")
  for phase in ("train", "val"):
    key = f"loss.task_specific.{phase}.funcs"
    problems += _length_problem(key, lookup(config, key), tasks)
  loss = config.loss
  if (weights := loss.grad_weighting.task.init_weights):
    problems += _length_problem("loss.grad_weighting.task.init_weights", weights, tasks)
  if any(enabled := loss.taxonomy_smoothing.enabled):
    problems += _length_problem("loss.taxonomy_smoothing.enabled", enabled, tasks)
  for entry in config.metrics.taxa_subsets:
    if len(entry) != 3 or entry[1] not in tasks:
      problems.append(f"metrics.taxa_subsets entry {tuple(entry)} must be (name, task key, "
                      f"taxon id) with a task of {tasks}")
  return problems


def _meta_problems(config, env) -> list[str]:
  """The enabled metadata components, and the component lists that name them."""
  del env
  problems, idxs = [], {}
  for name, comp in config.data.meta.components.items():
    if not comp.enabled:
      continue
    key = f"data.meta.components.{name}"
    if comp.dim < 1:
      problems.append(f"{key}.dim must be >= 1, got {comp.dim}")
    if not comp.source:
      problems.append(f"{key}.source is empty")
    if comp.columns and len(comp.columns) != comp.dim:
      problems.append(f"{key}.columns has {len(comp.columns)} names but dim is {comp.dim}")
    if comp.idx in idxs:
      problems.append(f"data.meta.components {idxs[comp.idx]} and {name} share idx {comp.idx}")
    idxs[comp.idx] = name
  names = [n for n, _ in enabled_components(config)]
  v = config.schedule.validation
  for key, combos in (("partial_mask_meta.whitelist", v.partial_mask_meta.whitelist),
                      ("final_epoch.exhaustive_meta_components",
                       [v.final_epoch.exhaustive_meta_components])):
    for combo in combos:
      if (unknown := [c for c in combo if c not in names]):
        problems.append(f"schedule.validation.{key}: {unknown} not among the enabled "
                        f"components {names}")
  return problems


def _data_problems(config, env) -> list[str]:
  """Image size, batch sizes against the devices, the sampler's pairs, the data source."""
  problems, d, n = [], config.data, env.num_devices
  if d.img_size < 32 or d.img_size % 32:
    problems.append(f"data.img_size must be a positive multiple of 32 (four stride-2 stages "
                    f"after the stride-4 stem), got {d.img_size}")
  for key, minimum in (("batch_size", 1), ("num_workers", 0), ("prefetch_threads", 0)):
    if (problem := _int_or_auto_problem(f"data.{key}", d[key], minimum)):
      problems.append(problem)
  if not env.auto_batch and d.batch_size % n:
    problems.append(f"data.batch_size {d.batch_size} must be a positive multiple of the {n} "
                    "devices")
  if d.batch_size_val > 0 and d.batch_size_val % n:
    problems.append(f"data.batch_size_val {d.batch_size_val} must be a multiple of the {n} "
                    "devices")
  mix = config.schedule.mix
  if d.sampler.type == "grouped":
    if not mix.group_levels or mix.group_levels[0] not in env.tasks:
      problems.append(f"schedule.mix.group_levels[0] must be a task key of data.task_keys_h5, "
                      f"got {list(mix.group_levels)[:1]}")
    if not env.auto_batch and (d.batch_size // n) % 2:
      problems.append(f"data.sampler.type 'grouped' pairs samples: the per-device batch "
                      f"({d.batch_size} / {n}) must be even")
  problems += [f"schedule.mix.null_task_keys: {k!r} is not a task key"
               for k in mix.null_task_keys if k not in env.tasks]
  if d.synthetic.enabled and d.synthetic.options.img_size != d.img_size:
    problems.append(f"data.synthetic.options.img_size ({d.synthetic.options.img_size}) differs "
                    f"from data.img_size ({d.img_size})")
  if env.need_data and not d.synthetic.enabled and not (
      d.h5.labels_path or d.h5.train_labels_path):
    problems.append("no data: set data.h5.labels_path (or train_labels_path), or enable "
                    "data.synthetic")
  return problems


def _aug_and_logging_problems(config, env) -> list[str]:
  del env
  problems = []
  if config.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
    problems.append("logging.wandb.enabled needs the wandb package: pip install -e '.[wandb]'")
  if (problem := autoaug_policy_problem(config.aug.autoaug.policy)):
    problems.append(problem)
  if config.aug.random_erase.count != 1:
    problems.append("aug.random_erase.count must be 1 (one box per sample)")
  ps = tuple(config.logging.profile_steps)
  if ps and not (len(ps) == 2 and all(isinstance(x, int) for x in ps) and 0 <= ps[0] < ps[1]):
    problems.append(f"logging.profile_steps must be () or (start, stop) with 0 <= start < stop, "
                    f"got {ps}")
  return problems


def _model_problems(config, env) -> list[str]:
  """The stages' shapes and the input normalisation."""
  del env
  problems, m, d = [], config.model, config.data
  cs, rs = m.convnext_stages, m.rope_stages
  if len(cs.dims) != 4:
    problems.append(f"model.convnext_stages.dims needs 4 entries, got {list(cs.dims)}")
  elif list(rs.dims) != list(cs.dims[2:]):
    problems.append(f"model.rope_stages.dims {list(rs.dims)} must equal "
                    f"model.convnext_stages.dims[2:] {list(cs.dims[2:])}")
  if len(cs.depths) < 2 or min(cs.depths[:2]) < 1:
    problems.append(f"model.convnext_stages.depths needs two positive entries, got "
                    f"{list(cs.depths)}")
  problems += [f"model.rope_stages.{key} needs 2 entries, got {list(rs[key])}"
               for key in ("depths", "dims", "num_heads", "mlp_ratio") if len(rs[key]) != 2]
  if len(rs.dims) == 2 and len(rs.num_heads) == 2:
    problems += [f"model.rope_stages: dim {dim} with {heads} heads needs an even integer head "
                 f"dim" for dim, heads in zip(rs.dims, rs.num_heads)
                 if dim % heads or (dim // heads) % 2]
  if not rs.rope_mixed:
    problems.append("model.rope_stages.rope_mixed=False (axial RoPE) is not supported yet")
  if len(d.image_mean) != len(d.image_std) or len(d.image_mean) not in (0, m.in_chans):
    problems.append(f"data.image_mean {list(d.image_mean)} and data.image_std "
                    f"{list(d.image_std)} need {m.in_chans} entries each (or none)")
  elif any(s <= 0 for s in d.image_std):
    problems.append(f"data.image_std must be positive, got {list(d.image_std)}")
  return problems


def _init_problems(config, env) -> list[str]:
  """model.init: one kind of source, and files that exist."""
  del env
  problems, init = [], config.model.init
  if init.checkpoint and (init.convnext or init.ropevit):
    problems.append("model.init: give either checkpoint or convnext/ropevit, not both")
  problems += [f"model.init.{key}: no such file: {init[key]}" for key in ("convnext", "ropevit")
               if init[key] and not os.path.isfile(init[key])]
  if init.checkpoint and not os.path.exists(init.checkpoint.rsplit(":", 1)[0]) and not (
      os.path.exists(init.checkpoint)):
    problems.append(f"model.init.checkpoint: no such file or folder: {init.checkpoint}")
  return problems


def _train_problems(config, env) -> list[str]:
  """Training length, micro-batches and the early-stopping metric."""
  problems, t, d = [], config.train, config.data
  k = t.accumulation_steps
  if k > 1 and not env.auto_batch and (
      d.batch_size % (2 * k) or (d.batch_size // k) % env.num_devices):
    problems.append(f"data.batch_size {d.batch_size} must split into train.accumulation_steps "
                    f"({k}) micro-batches of whole pairs, each a multiple of the "
                    f"{env.num_devices} devices")
  if t.steps <= 0 and t.epochs <= 0:
    problems.append("set train.steps or train.epochs to a positive number")
  metric = t.early_stop.metric
  if "/" not in metric or not metric.startswith("val"):
    problems.append(f"train.early_stop.metric {metric!r} must be '<val phase>/<metric>', "
                    "e.g. 'val/loss' or 'val/acc1/taxa_L10'")
  return problems


def _filter_problem(key: str, text: str) -> list[str]:
  problem = param_filters.problem(text)
  return [f"{key} {text!r}: {problem}"] if problem else []


def _param_group_problem(key: str, node, needs_filter: bool = True) -> list[str]:
  e = param_group_values(node)
  problems = _filter_problem(f"{key}.decay", e["decay"])
  if e["optimizer"] and e["optimizer"] not in OPTIMIZERS:
    problems.append(f"{key}.optimizer {e['optimizer']!r} not in {OPTIMIZERS} "
                    f"('' = optimizer.name)")
  if not e["lr_multiplier"] > 0:
    problems.append(f"{key}.lr_multiplier must be > 0, got {e['lr_multiplier']}")
  if not needs_filter:
    return problems
  if not e["filter"]:
    return problems + [f"{key}.filter is empty (use 'all' to match everything)"]
  return problems + _filter_problem(f"{key}.filter", e["filter"])


def _optimizer_problems(config, env) -> list[str]:
  """Betas, filters and parameter groups (docs/optimization.md)."""
  del env
  o = config.optimizer
  pg, order = o.parameter_groups, list(o.parameter_groups.order)
  problems = _filter_problem("optimizer.muon.adamw_filter", o.muon.adamw_filter)
  if len(o.betas) not in (2, 3) or not all(0.0 <= b < 1.0 for b in o.betas):
    problems.append(f"optimizer.betas must be 2 or 3 numbers in [0, 1), got {tuple(o.betas)}")
  if o.freeze:
    problems += _filter_problem("optimizer.freeze", o.freeze)
  problems += _param_group_problem("optimizer.parameter_groups.default", pg.default, False)
  if len(set(order)) != len(order):
    problems.append(f"optimizer.parameter_groups.order has duplicates: {order}")
  problems += [f"optimizer.parameter_groups.order names {name!r}, which is not in "
               f"optimizer.parameter_groups.groups" for name in order if name not in pg.groups]
  for name, node in pg.groups.items():
    key = f"optimizer.parameter_groups.groups.{name}"
    if name == "frozen" and o.freeze:
      problems.append(f"{key}: 'frozen' is the name of optimizer.freeze's parameters; rename it")
    if name == "default":
      problems.append(f"{key}: 'default' is reserved (set optimizer.parameter_groups.default)")
    if name not in order:
      problems.append(f"{key} is not in optimizer.parameter_groups.order (the matching order)")
    problems += _param_group_problem(key, node)
  return problems


def _lr_problems(config, env) -> list[str]:
  """What each learning-rate schedule needs."""
  del env
  problems, s = [], config.lr_scheduler
  if s.min_lr > s.base_lr:
    problems.append(f"lr_scheduler.min_lr {s.min_lr} exceeds base_lr {s.base_lr}")
  if s.name == "step" and (s.decay_steps < 1 or not 0.0 < s.decay_rate <= 1.0):
    problems.append(f"lr_scheduler 'step' needs decay_steps >= 1 and decay_rate in (0, 1], got "
                    f"{s.decay_steps}, {s.decay_rate}")
  fr = (s.stable_duration_fraction, s.decay_duration_fraction)
  if s.name == "wsd" and (min(fr) < 0 or fr[1] <= 0 or sum(fr) > 1.0):
    problems.append(f"lr_scheduler 'wsd' needs stable_duration_fraction >= 0, "
                    f"decay_duration_fraction > 0 and their sum <= 1, got {fr}")
  if s.scale_by_batch and s.reference_bs < 1:
    problems.append(f"lr_scheduler.reference_bs must be >= 1, got {s.reference_bs}")
  return problems


def _has_duration(config, name: str) -> bool:
  return bool(_members(config, name)) or DURATIONS[name].default is not None


def _schedule_problems(config, env) -> list[str]:
  """Enabled ramps: probabilities and an end; partial masking's whitelist and window."""
  del env
  problems = []
  for name, end in RAMPS.items():
    node = lookup(config, name)
    if not node.enabled:
      continue
    problems += [f"{name}.{key} must be in [0, 1], got {node[key]}"
                 for key in ("start_prob", "end_prob") if not 0.0 <= node[key] <= 1.0]
    if node.start_prob != node.end_prob and not _has_duration(config, f"{name}.{end}"):
      problems.append(f"{name} ramps {node.start_prob} -> {node.end_prob} but has no end: set "
                      f"{end}_steps or {end}_fraction")
  pm, names = config.schedule.meta_masking.partial, [n for n, _ in enabled_components(config)]
  if not pm.enabled:
    return problems
  if not pm.whitelist:
    problems.append("schedule.meta_masking.partial is enabled with an empty whitelist")
  problems += [f"schedule.meta_masking.partial.whitelist entry {list(combo)}: components must "
               f"be among the enabled {names}" for combo in pm.whitelist
               if not combo or any(c not in names for c in combo)]
  if pm.weights and (len(pm.weights) != len(pm.whitelist) or min(pm.weights) <= 0):
    problems.append(f"schedule.meta_masking.partial.weights {list(pm.weights)} must be "
                    f"{len(pm.whitelist)} positive numbers (one per whitelist entry) or empty")
  if not _has_duration(config, "schedule.meta_masking.partial.end"):
    problems.append("schedule.meta_masking.partial is enabled but has no end: set end_steps "
                    "or end_fraction")
  return problems


def _mix_problems(config, env) -> list[str]:
  """Selective mixing needs the grouped sampler's partners and a mixing method."""
  del env
  problems, mix = [], config.schedule.mix
  if mix.prob.enabled:
    if config.data.sampler.type != "grouped":
      problems.append("schedule.mix.prob.enabled needs data.sampler.type 'grouped' (partners)")
    if not (mix.mixup.enabled or mix.cutmix.enabled):
      problems.append("schedule.mix.prob.enabled but neither mix.mixup nor mix.cutmix is")
  mm = list(mix.cutmix.minmax)
  if mm and not (len(mm) == 2 and 0.0 <= mm[0] < mm[1] <= 1.0):
    problems.append(f"schedule.mix.cutmix.minmax must be () or (a, b) with 0 <= a < b <= 1, "
                    f"got {tuple(mm)}")
  return problems


# The rules between keys, by section; each returns its problems.
CHECKS = (_task_problems, _meta_problems, _data_problems, _aug_and_logging_problems,
          _model_problems, _init_problems, _train_problems, _optimizer_problems, _lr_problems,
          _schedule_problems, _mix_problems)


# ----------------------------------------------------------------------------- Runs


def total_steps(config, steps_per_epoch: int) -> int:
  if config.train.steps > 0:
    return int(config.train.steps)
  return int(math.ceil(config.train.epochs * steps_per_epoch))


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config written by `to_json` (DIR/config.json), with defaults for keys added since; its
  lists come back as tuples, so that it can still be overridden on the command line. A file
  written before the one-member rule keeps the member of each duration that counted then."""
  config = with_defaults(ml_collections.ConfigDict(tuples(json.loads(text))))
  _keep_first_members(config)
  return config


def read_json(path: str) -> ml_collections.ConfigDict:
  """`from_json` of the file at `path` (e.g. a training run's DIR/config.json)."""
  with open(path, encoding="utf-8") as f:
    return from_json(f.read())
