"""The config schema, its validation and its resolution against the data.

Key paths are the original's YACS paths lower-cased with the same nesting
(`DATA.H5.LABELS_PATH` -> `config.data.h5.labels_path`); names that are data keep their case
(task keys such as `taxa_L10`, components `TEMPORAL`). `base_config()` holds every known key with
the original's defaults; files in `configs/` start from it. `validate()` lists every unknown key
and every inconsistent value in one error.

Every key can be set on the command line (`--config.data.batch_size=32`): sequences are tuples,
which ml_collections parses from Python literals (`--config.data.task_keys_h5="('taxa_L10',
'taxa_L20')"`, nested for whitelists). New entries of the open subtrees (`OPEN_SUBTREES`) need a
config file. Nothing here imports jax, so that checking a config is cheap.
"""

from __future__ import annotations

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


def base_config() -> ml_collections.ConfigDict:
  """Every known key, with the original's defaults where it has one (sequences as tuples)."""
  c = ml_collections.ConfigDict()
  c.data = dict(
      # images_path, train_/val_images_path: an images.h5 of decoded (N, H, W, 3) arrays, or a
      # shard set of encoded images (data/shards.py) as a glob '/data/images-*.h5' and/or
      # comma-separated paths; rows aligned with the labels file's.
      h5=dict(labels_path="", images_path="", train_labels_path="", val_labels_path="",
              train_images_path="", val_images_path="", train_val_split_ratio=0.9,
              train_val_split_seed=42),
      hybrid=dict(use_hybrid=False, images_dir="", file_extension=".jpg",
                  # Ours: 'error' | 'skip' | 'placeholder' (the original's ALLOW_MISSING_IMAGES).
                  missing_image_policy="error",
                  verify_images=dict(enabled=False, max_missing_ratio=1.0, max_missing_count=-1,
                                     num_workers=8, decode=False, report_path="")),
      sampler=dict(type="grouped"),  # 'grouped' (pairs for mixing) | 'standard'
      taxonomy=dict(path="", multi_parent="error"),  # ours: taxonomy_tree.json; or 'majority' 
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
      rope_mode="rotate",  # 'rotate' | 'cos_only' (original defect, converted checkpoints only)
      attn_scale="rsqrt_head_dim",  # 'rsqrt_head_dim' | 'inv_head_dim' (original flash path)
      meta_missing="learned_token",  # 'learned_token' | 'zeros' (the original)
      # 'auto' (hardware.py): cuDNN's fused attention on NVIDIA GPUs where it runs, else XLA.
      attention_impl="auto",  # 'auto' | 'xla' | 'cudnn'
      dtype="auto",  # compute dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); params f32
      scan_blocks=True,  # identical blocks of a stage under nnx.scan (one compiled block)
      remat="none",  # 'none' | 'full' | 'dots': recompute block activations in the backward pass
      depthwise_impl="shift",  # 'shift' (fused shifted sums) | 'conv' (grouped lax.conv)
      classification=dict(heads={k: head_template().to_dict() for k in TASK_KEYS}),
      # Ours (docs/finetuning.md): initial weights. convnext / ropevit: ImageNet checkpoints
      # stitched into the ConvNeXt and RoPE stages; checkpoint: an earlier model (a workdir,
      # `DIR:step`, a bundle, a converted or an original checkpoint). allow_partial: report
      # unknown keys and mismatched shapes instead of failing. match_normalization: take the
      # source's input mean/std when data.image_mean is ().
      init=dict(convnext="", ropevit="", checkpoint="", allow_partial=False,
                match_normalization=True),
  )
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
      name="cosine",  # cosine | linear | step | wsd | constant, measured from the warmup end
      base_lr=1e-4, warmup_lr=5e-7, min_lr=1e-5,
      warmup_epochs=5.0, warmup_fraction=-1.0, warmup_steps=0,  # steps > fraction > epochs
      decay_steps=5000, decay_rate=0.1,  # step: x decay_rate every decay_steps
      stable_duration_fraction=0.8, decay_duration_fraction=0.1,  # wsd, of the post-warmup steps
      decay_type="cosine",  # wsd's decay: cosine | linear
      # LR, warmup_lr and min_lr x data.batch_size / reference_bs (the original always scaled,
      # but only its first step took effect).
      scale_by_batch=False, reference_bs=512)
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
      # Ramps p(step) = start -> end, linear until the end (steps > fraction; <= 0 = unset).
      # Full metadata masking ends at 30% of training (the original gave no end and fell back to
      # 5000 steps).
      meta_masking=dict(
          enabled=True, start_prob=1.0, end_prob=0.0, end_steps=0, end_fraction=0.3,
          # Partial masking: active in [start, end); its probability ramps from step 0 to
          # prob_end; each masked sample gets one whitelist combination, drawn by weights.
          partial=dict(enabled=False, start_steps=0, start_fraction=-1.0, end_steps=0,
                       end_fraction=-1.0, start_prob=0.01, end_prob=0.7, prob_end_steps=0,
                       prob_end_fraction=0.5, whitelist=(), weights=())),
      # Probability of keeping a null label's loss (per task, per sample); disabled = 1.
      null_masking=dict(enabled=False, start_prob=0.0, end_prob=1.0, end_steps=0,
                        end_fraction=-1.0),
      # Intervals: steps > fraction (of total steps) > epochs; <= 0 means unset.
      # Validation passes (docs/evaluation.md): `val` (metadata as given), `val_mask_meta` (all
      # components masked), one `val_mask_<A>_<B>` per partial_mask_meta.whitelist entry, and at
      # the end the exhaustive passes over every non-empty proper subset of the components.
      validation=dict(
          interval_steps=0, interval_fraction=-1.0, interval_epochs=1.0,
          mask_meta_interval_steps=0, mask_meta_interval_fraction=-1.0,
          mask_meta_interval_epochs=1.0,
          partial_mask_meta=dict(enabled=False, interval_steps=0, interval_fraction=-1.0,
                                 interval_epochs=1.0, whitelist=()),
          final_epoch=dict(exhaustive_partial_meta_validation=False,
                           exhaustive_meta_components=())),  # () = every enabled component
      checkpoint=dict(interval_steps=0, interval_fraction=-1.0, interval_epochs=1.0,
                      keep_last_n=2, keep_top_n=0),
      metrics=dict(console_interval=100, tensorboard_interval=50),
      # Selective mixing of the sampler's partners (same group at group_levels[0]). Off by
      # default: the original's default (constant 0.2, tested twice) mixed 4% of batches.
      mix=dict(group_levels=("taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"), min_group_size=4,
               exclude_null_samples=False, null_task_keys=(),
               prob=dict(enabled=False, start_prob=1.0, end_prob=0.2, end_steps=0,
                         end_fraction=-1.0),
               switch_prob=0.5,  # CutMix instead of Mixup when both are enabled
               mixup=dict(enabled=True, alpha=1.0),
               cutmix=dict(enabled=False, alpha=1.0, minmax=()),
               meta_mix="pick"),  # 'pick' | 'prefer_valid' (docs/training.md)
  )
  c.aug = dict(autoaug=dict(policy="original"),  # 'none' | 'original' | 'rand-m<M>-n<N>'
               random_erase=dict(prob=0.25, mode="pixel", area_range=(0.02, 0.4),
                                 aspect_ratio=(0.3, 3.3), count=1))
  # Per-subset top-1 (`subset_acc1/<name>/<task>`): taxa subsets as (name, task key, taxon id),
  # and rarity bins of the finest rank's classes by percentiles of the train class counts.
  c.metrics = dict(taxa_subsets=(), rarity_percentiles=(1, 5, 25, 50, 75, 90, 95, 99))
  # auto_choices: ours, filled by training: what each 'auto' setting became, and why.
  c.misc = dict(seed=42, auto_choices=())
  # Ours (docs/training.md#weights--biases): mirror TensorBoard's scalars and plots to a W&B run
  # (pip install -e '.[wandb]'). mode: '' (W&B's default, WANDB_MODE), 'online' or 'offline'.
  c.logging = dict(wandb=dict(enabled=False, project="linnaeus_jax", entity="", name="",
                              mode="", tags=()))
  # docs/distributed.md. data x fsdp = all devices (of all processes); data=-1: the rest. fsdp > 1
  # splits every state array of >= fsdp_min_size elements along its largest divisible dimension.
  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**14)
  return c


def sibling(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file `name` in `config_file`'s folder: config files that
  build on another (configs/inat21.py on sm.py) call it with their `__file__`."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def load_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns base_config() updated with `config`, so absent keys get their defaults.

  The entries of an open subtree are data: `config`'s replace the defaults' (each completed from
  its template), so that e.g. a run with two heads does not get the four default ones back.
  """
  merged = base_config()
  _merge(merged, config)
  return merged


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
                f"line: add it in a config file (e.g. a copy of configs/sm.py): "
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


def validate(config, num_devices: int = 1, need_data: bool = True) -> None:
  """Raises ConfigError listing every unknown key and inconsistent value.

  `need_data=False` accepts a config without a data source (e.g. to build the model alone).
  """
  problems: list[str] = []
  _unknown_keys(config, base_config(), "", problems)
  if problems:  # value checks below would only add noise about misspelled keys
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
  d, m, t = config.data, config.model, config.train

  tasks = list(d.task_keys_h5)
  try:
    levels = [task_level(k) for k in tasks]
    if any(b <= a for a, b in zip(levels, levels[1:])):
      problems.append(f"data.task_keys_h5 must be strictly ascending in level, finest first: {tasks}")
  except ConfigError as e:
    problems.append(str(e))
  if not tasks:
    problems.append("data.task_keys_h5 is empty")
  heads = m.classification.heads
  if sorted(heads.keys()) != sorted(tasks):
    problems.append(f"model.classification.heads has {sorted(heads.keys())} but "
                    f"data.task_keys_h5 is {tasks}")
  for name, head in heads.items():
    if head.type not in HEAD_TYPES:
      problems.append(f"model.classification.heads.{name}.type {head.type!r} not in {HEAD_TYPES}")
    if head.get("routing_strategy", "soft") not in ROUTINGS:
      problems.append(f"model.classification.heads.{name}.routing_strategy "
                      f"{head.routing_strategy!r} not in {ROUTINGS}")
    if not head.get("temperature", 1.0) > 0:
      problems.append(f"model.classification.heads.{name}.temperature must be > 0, got "
                      f"{head.temperature}")
  for phase in ("train", "val"):
    funcs = list(config.loss.task_specific[phase].funcs)
    if len(funcs) != len(tasks):
      problems.append(f"loss.task_specific.{phase}.funcs has {len(funcs)} entries for "
                      f"{len(tasks)} tasks")
    for f in funcs:
      if f not in LOSSES:
        problems.append(f"loss.task_specific.{phase}.funcs: {f!r} not in {LOSSES}")
  weights = list(config.loss.grad_weighting.task.init_weights)
  if weights and len(weights) != len(tasks):
    problems.append(f"loss.grad_weighting.task.init_weights has {len(weights)} entries for "
                    f"{len(tasks)} tasks")

  idxs = {}
  for name, comp in d.meta.components.items():
    if not comp.enabled:
      continue
    if comp.dim < 1:
      problems.append(f"data.meta.components.{name}.dim must be >= 1, got {comp.dim}")
    if not comp.source:
      problems.append(f"data.meta.components.{name}.source is empty")
    if comp.columns and len(comp.columns) != comp.dim:
      problems.append(f"data.meta.components.{name}.columns has {len(comp.columns)} names but "
                      f"dim is {comp.dim}")
    if comp.idx in idxs:
      problems.append(f"data.meta.components {idxs[comp.idx]} and {name} share idx {comp.idx}")
    idxs[comp.idx] = name

  if d.img_size < 32 or d.img_size % 32:
    problems.append(f"data.img_size must be a positive multiple of 32 (four stride-2 stages "
                    f"after the stride-4 stem), got {d.img_size}")
  for key, minimum in (("batch_size", 1), ("num_workers", 0), ("prefetch_threads", 0)):
    if (problem := _int_or_auto_problem(f"data.{key}", d[key], minimum)):
      problems.append(problem)
  auto_batch = not isinstance(d.batch_size, int)  # 'auto' (or invalid, reported above)
  if not auto_batch and d.batch_size % num_devices:
    problems.append(f"data.batch_size {d.batch_size} must be a positive multiple of the "
                    f"{num_devices} devices")
  if not 0.0 <= d.batch_size_headroom < 1.0:
    problems.append(f"data.batch_size_headroom must be in [0, 1), got {d.batch_size_headroom}")
  if d.batch_size_val > 0 and d.batch_size_val % num_devices:
    problems.append(f"data.batch_size_val {d.batch_size_val} must be a multiple of the "
                    f"{num_devices} devices")
  for key, value, allowed in (
      ("data.hybrid.missing_image_policy", d.hybrid.missing_image_policy,
       ("error", "skip", "placeholder")),
      ("data.sampler.type", d.sampler.type, ("grouped", "standard")),
      ("data.taxonomy.multi_parent", d.taxonomy.multi_parent, ("error", "majority")),
      ("logging.wandb.mode", config.logging.wandb.mode, ("", "online", "offline"))):
    if value not in allowed:
      problems.append(f"{key} {value!r} not in {allowed}")
  if config.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
    problems.append("logging.wandb.enabled needs the wandb package: pip install -e '.[wandb]'")
  if (problem := autoaug_policy_problem(config.aug.autoaug.policy)):
    problems.append(problem)
  er = config.aug.random_erase
  if er.mode not in ERASE_MODES:
    problems.append(f"aug.random_erase.mode {er.mode!r} not in {ERASE_MODES}")
  if er.count != 1:
    problems.append("aug.random_erase.count must be 1 (one box per sample)")
  if not 0.0 <= er.prob <= 1.0:
    problems.append(f"aug.random_erase.prob must be in [0, 1], got {er.prob}")
  mix = config.schedule.mix
  if d.sampler.type == "grouped":
    if not mix.group_levels or mix.group_levels[0] not in tasks:
      problems.append(f"schedule.mix.group_levels[0] must be a task key of data.task_keys_h5, "
                      f"got {list(mix.group_levels)[:1]}")
    if not auto_batch and (d.batch_size // num_devices) % 2:
      problems.append(f"data.sampler.type 'grouped' pairs samples: the per-device batch "
                      f"({d.batch_size} / {num_devices}) must be even")
  for key in mix.null_task_keys:
    if key not in tasks:
      problems.append(f"schedule.mix.null_task_keys: {key!r} is not a task key")
  if not 0.0 < d.h5.train_val_split_ratio <= 1.0:
    problems.append(f"data.h5.train_val_split_ratio must be in (0, 1], got "
                    f"{d.h5.train_val_split_ratio}")
  if d.synthetic.enabled and d.synthetic.options.img_size != d.img_size:
    problems.append(f"data.synthetic.options.img_size ({d.synthetic.options.img_size}) differs "
                    f"from data.img_size ({d.img_size})")
  if need_data and not d.synthetic.enabled and not (d.h5.labels_path or d.h5.train_labels_path):
    problems.append("no data: set data.h5.labels_path (or train_labels_path), or enable "
                    "data.synthetic")

  cs, rs = m.convnext_stages, m.rope_stages
  if len(cs.dims) != 4:
    problems.append(f"model.convnext_stages.dims needs 4 entries, got {list(cs.dims)}")
  elif list(rs.dims) != list(cs.dims[2:]):
    problems.append(f"model.rope_stages.dims {list(rs.dims)} must equal "
                    f"model.convnext_stages.dims[2:] {list(cs.dims[2:])}")
  if len(cs.depths) < 2 or min(cs.depths[:2]) < 1:
    problems.append(f"model.convnext_stages.depths needs two positive entries, got "
                    f"{list(cs.depths)}")
  for key in ("depths", "dims", "num_heads", "mlp_ratio"):
    if len(rs[key]) != 2:
      problems.append(f"model.rope_stages.{key} needs 2 entries, got {list(rs[key])}")
  if len(rs.dims) == 2 and len(rs.num_heads) == 2:
    for dim, heads in zip(rs.dims, rs.num_heads):
      if dim % heads or (dim // heads) % 2:
        problems.append(f"model.rope_stages: dim {dim} with {heads} heads needs an even "
                        f"integer head dim")
  for key, allowed in (("rope_mode", ("rotate", "cos_only")),
                       ("attn_scale", ("rsqrt_head_dim", "inv_head_dim")),
                       ("meta_missing", ("learned_token", "zeros")),
                       ("attention_impl", ("auto", "xla", "cudnn")),
                       ("remat", REMAT),
                       ("depthwise_impl", ("shift", "conv")),
                       ("dtype", ("auto", "float32", "bfloat16"))):
    if m[key] not in allowed:
      problems.append(f"model.{key} {m[key]!r} not in {allowed}")
  if not m.rope_stages.rope_mixed:
    problems.append("model.rope_stages.rope_mixed=False (axial RoPE) is not supported yet")
  for key in ("drop_path_rate", "drop_rate", "label_smoothing"):
    if not 0.0 <= m[key] < 1.0:
      problems.append(f"model.{key} must be in [0, 1), got {m[key]}")
  if m.in_chans < 1:
    problems.append(f"model.in_chans must be >= 1, got {m.in_chans}")
  if not 0.0 < rs.norm_eps < 1.0:
    problems.append(f"model.rope_stages.norm_eps must be in (0, 1), got {rs.norm_eps}")
  init = m.init
  if init.checkpoint and (init.convnext or init.ropevit):
    problems.append("model.init: give either checkpoint or convnext/ropevit, not both")
  for key in ("convnext", "ropevit"):
    path = init[key]
    if path and not os.path.isfile(path):
      problems.append(f"model.init.{key}: no such file: {path}")
  if init.checkpoint and not os.path.exists(init.checkpoint.rsplit(":", 1)[0]) and not (
      os.path.exists(init.checkpoint)):
    problems.append(f"model.init.checkpoint: no such file or folder: {init.checkpoint}")
  if len(d.image_mean) != len(d.image_std) or len(d.image_mean) not in (0, m.in_chans):
    problems.append(f"data.image_mean {list(d.image_mean)} and data.image_std "
                    f"{list(d.image_std)} need {m.in_chans} entries each (or none)")
  elif any(s <= 0 for s in d.image_std):
    problems.append(f"data.image_std must be positive, got {list(d.image_std)}")
  o = config.optimizer
  if not 0.0 < o.layer_decay <= 1.0:
    problems.append(f"optimizer.layer_decay must be in (0, 1], got {o.layer_decay}")

  if t.resume_step < -1:
    problems.append(f"train.resume_step must be a checkpoint step or -1 (latest), got "
                    f"{t.resume_step}")
  if t.nonfinite_patience < 1:
    problems.append("train.nonfinite_patience must be >= 1")
  es = t.early_stop
  if es.mode not in ("auto", "min", "max"):
    problems.append(f"train.early_stop.mode {es.mode!r} not in ('auto', 'min', 'max')")
  if "/" not in es.metric or not es.metric.startswith("val"):
    problems.append(f"train.early_stop.metric {es.metric!r} must be '<val phase>/<metric>', "
                    "e.g. 'val/loss' or 'val/acc1/taxa_L10'")
  if es.patience_evals < 1:
    problems.append("train.early_stop.patience_evals must be >= 1 (validations)")
  if config.schedule.checkpoint.keep_top_n < 0:
    problems.append("schedule.checkpoint.keep_top_n must be >= 0")
  k = t.accumulation_steps
  if k < 1:
    problems.append(f"train.accumulation_steps must be >= 1, got {k}")
  elif k > 1 and not auto_batch and (
      d.batch_size % (2 * k) or (d.batch_size // k) % num_devices):
    problems.append(f"data.batch_size {d.batch_size} must split into train.accumulation_steps "
                    f"({k}) micro-batches of whole pairs, each a multiple of the {num_devices} "
                    f"devices")
  for key, unset in (("steps", "train.epochs counts"), ("epochs", "unused; train.steps counts")):
    if t[key] < 0:
      problems.append(f"train.{key} must be >= 0 (0: {unset}), got {t[key]}")
  if t.steps <= 0 and t.epochs <= 0:
    problems.append("set train.steps or train.epochs to a positive number")
  problems += _optimizer_problems(config)  # optimizer.*, lr_scheduler.*, parameter groups
  problems += _training_dynamics_problems(config, tasks)
  if config.schedule.checkpoint.keep_last_n < 1:
    problems.append("schedule.checkpoint.keep_last_n must be >= 1")
  for key in ("console_interval", "tensorboard_interval"):
    if config.schedule.metrics[key] < 1:
      problems.append(f"schedule.metrics.{key} must be >= 1")
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def autoaug_policy_problem(policy: str) -> str | None:
  """None if `policy` is a valid aug.autoaug.policy, else the problem."""
  if policy in AUTOAUG_POLICIES or RANDAUG.fullmatch(policy):
    return None
  return f"aug.autoaug.policy {policy!r}: expected 'none', 'original' or 'rand-m<M>-n<N>'"


def _optimizer_problems(config) -> list[str]:
  """Problems of the optimizer and lr_scheduler sections (docs/optimization.md)."""
  problems, o, s = [], config.optimizer, config.lr_scheduler
  pg = o.parameter_groups

  def check_filter(key, text):
    if (problem := param_filters.problem(text)):
      problems.append(f"{key} {text!r}: {problem}")

  def check_group(key, node):
    e = param_group_values(node)
    if e["optimizer"] and e["optimizer"] not in OPTIMIZERS:
      problems.append(f"{key}.optimizer {e['optimizer']!r} not in {OPTIMIZERS} "
                      f"('' = optimizer.name)")
    if not e["lr_multiplier"] > 0:
      problems.append(f"{key}.lr_multiplier must be > 0, got {e['lr_multiplier']}")
    check_filter(f"{key}.decay", e["decay"])
    return e

  if o.name not in OPTIMIZERS:
    problems.append(f"optimizer.name {o.name!r} not in {OPTIMIZERS}")
  if len(o.betas) not in (2, 3) or not all(0.0 <= b < 1.0 for b in o.betas):
    problems.append(f"optimizer.betas must be 2 or 3 numbers in [0, 1), got {tuple(o.betas)}")
  if not 0.0 <= o.momentum < 1.0:
    problems.append(f"optimizer.momentum must be in [0, 1), got {o.momentum}")
  if o.weight_decay < 0:
    problems.append(f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
  if o.muon.ns_steps < 1:
    problems.append("optimizer.muon.ns_steps must be >= 1")
  check_filter("optimizer.muon.adamw_filter", o.muon.adamw_filter)
  if o.freeze:
    check_filter("optimizer.freeze", o.freeze)
  check_group("optimizer.parameter_groups.default", pg.default)
  order = list(pg.order)
  if len(set(order)) != len(order):
    problems.append(f"optimizer.parameter_groups.order has duplicates: {order}")
  for name in order:
    if name not in pg.groups:
      problems.append(f"optimizer.parameter_groups.order names {name!r}, which is not in "
                      f"optimizer.parameter_groups.groups")
  for name, node in pg.groups.items():
    key = f"optimizer.parameter_groups.groups.{name}"
    if name == "frozen" and o.freeze:
      problems.append(f"{key}: 'frozen' is the name of optimizer.freeze's parameters; rename it")
    if name == "default":
      problems.append(f"{key}: 'default' is reserved (set optimizer.parameter_groups.default)")
    if name not in order:
      problems.append(f"{key} is not in optimizer.parameter_groups.order (the matching order)")
    e = check_group(key, node)
    if not e["filter"]:
      problems.append(f"{key}.filter is empty (use 'all' to match everything)")
    else:
      check_filter(f"{key}.filter", e["filter"])

  if s.name not in LR_SCHEDULES:
    problems.append(f"lr_scheduler.name {s.name!r} not in {LR_SCHEDULES}")
  if s.base_lr <= 0:
    problems.append(f"lr_scheduler.base_lr must be positive, got {s.base_lr}")
  if s.min_lr > s.base_lr:
    problems.append(f"lr_scheduler.min_lr {s.min_lr} exceeds base_lr {s.base_lr}")
  if s.warmup_lr < 0 or s.min_lr < 0:
    problems.append("lr_scheduler.warmup_lr and min_lr must be >= 0")
  if s.decay_type not in DECAY_TYPES:
    problems.append(f"lr_scheduler.decay_type {s.decay_type!r} not in {DECAY_TYPES}")
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


def _training_dynamics_problems(config, tasks) -> list[str]:
  """Masking, null, mixing and loss-weighting options (docs/training.md)."""
  problems, s = [], config.schedule
  names = [n for n, _ in enabled_components(config)]
  pm = s.meta_masking.partial
  ramps = {"schedule.meta_masking": s.meta_masking, "schedule.meta_masking.partial": pm,
           "schedule.null_masking": s.null_masking, "schedule.mix.prob": s.mix.prob}
  for name, node in ramps.items():
    for key in ("start_prob", "end_prob"):
      if node.enabled and not 0.0 <= node[key] <= 1.0:
        problems.append(f"{name}.{key} must be in [0, 1], got {node[key]}")
    if (node.enabled and name != "schedule.meta_masking.partial"  # its end: below
        and node.start_prob != node.end_prob and node.end_steps <= 0 and node.end_fraction <= 0):
      problems.append(f"{name} ramps {node.start_prob} -> {node.end_prob} but has no end: set "
                      "end_steps or end_fraction")
  if pm.enabled:
    if not pm.whitelist:
      problems.append("schedule.meta_masking.partial is enabled with an empty whitelist")
    for combo in pm.whitelist:
      unknown = [c for c in combo if c not in names]
      if not combo or unknown:
        problems.append(f"schedule.meta_masking.partial.whitelist entry {list(combo)}: "
                        f"components must be among the enabled {names}")
    if pm.weights and (len(pm.weights) != len(pm.whitelist) or min(pm.weights) <= 0):
      problems.append(f"schedule.meta_masking.partial.weights {list(pm.weights)} must be "
                      f"{len(pm.whitelist)} positive numbers (one per whitelist entry) or empty")
    if pm.end_steps <= 0 and pm.end_fraction < 0:
      problems.append("schedule.meta_masking.partial is enabled but has no end: set end_steps "
                      "or end_fraction")
  for entry in config.metrics.taxa_subsets:
    if len(entry) != 3 or entry[1] not in tasks:
      problems.append(f"metrics.taxa_subsets entry {tuple(entry)} must be (name, task key, "
                      f"taxon id) with a task of {tasks}")
  v = s.validation
  for key, combos in (("partial_mask_meta.whitelist", v.partial_mask_meta.whitelist),
                      ("final_epoch.exhaustive_meta_components",
                       [v.final_epoch.exhaustive_meta_components])):
    for combo in combos:
      unknown = [c for c in combo if c not in names]
      if unknown:
        problems.append(f"schedule.validation.{key}: {unknown} not among the enabled "
                        f"components {names}")
  mix = s.mix
  if mix.meta_mix not in ("pick", "prefer_valid"):
    problems.append(f"schedule.mix.meta_mix {mix.meta_mix!r} not in ('pick', 'prefer_valid')")
  if mix.prob.enabled:
    if config.data.sampler.type != "grouped":
      problems.append("schedule.mix.prob.enabled needs data.sampler.type 'grouped' (partners)")
    if not (mix.mixup.enabled or mix.cutmix.enabled):
      problems.append("schedule.mix.prob.enabled but neither mix.mixup nor mix.cutmix is")
  for key in ("mixup", "cutmix"):
    if mix[key].alpha <= 0:
      problems.append(f"schedule.mix.{key}.alpha must be > 0, got {mix[key].alpha}")
  mm = list(mix.cutmix.minmax)
  if mm and not (len(mm) == 2 and 0.0 <= mm[0] < mm[1] <= 1.0):
    problems.append(f"schedule.mix.cutmix.minmax must be () or (a, b) with 0 <= a < b <= 1, "
                    f"got {tuple(mm)}")
  gw = config.loss.grad_weighting
  if gw.task.type not in TASK_WEIGHTING:
    problems.append(f"loss.grad_weighting.task.type {gw.task.type!r} not in {TASK_WEIGHTING}")
  if gw.task.update_interval < 1:
    problems.append("loss.grad_weighting.task.update_interval must be >= 1")
  if gw["class"].method not in CLASS_WEIGHTS:
    problems.append(f"loss.grad_weighting.class.method {gw['class'].method!r} not in "
                    f"{CLASS_WEIGHTS}")
  enabled = list(config.loss.taxonomy_smoothing.enabled)
  if any(enabled) and len(enabled) != len(tasks):
    problems.append(f"loss.taxonomy_smoothing.enabled has {len(enabled)} entries for "
                    f"{len(tasks)} tasks")
  return problems


def resolve_steps(steps: int, fraction: float, epochs: float, total_steps: int,
                  steps_per_epoch: int) -> int:
  """The one precedence rule: steps > fraction > epochs; 0 = unset
  (docs/design.md#one-step-resolution-rule-for-schedules)."""
  if steps > 0:
    return int(steps)
  if fraction >= 0:
    return max(1, round(total_steps * fraction))
  if epochs > 0:
    return max(1, round(epochs * steps_per_epoch))
  return 0


def total_steps(config, steps_per_epoch: int) -> int:
  if config.train.steps > 0:
    return int(config.train.steps)
  return int(math.ceil(config.train.epochs * steps_per_epoch))


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config written by `to_json` (DIR/config.json), with defaults for keys added since; its
  lists come back as tuples, so that it can still be overridden on the command line."""
  return load_overrides(ml_collections.ConfigDict(tuples(json.loads(text))))


def read_json(path: str) -> ml_collections.ConfigDict:
  """`from_json` of the file at `path` (e.g. a training run's DIR/config.json)."""
  with open(path, encoding="utf-8") as f:
    return from_json(f.read())
