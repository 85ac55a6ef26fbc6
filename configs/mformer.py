"""mFormerV1 (docs/model.md#sizes) on a labels.h5 dataset at 384x384: one training recipe, the
variant picks only the size (sm, md, lg, xl; the model keys of `config.MFORMER_V1_SIZES`).

    python -m linnaeus_jax.main --config=configs/mformer.py:md --workdir=DIR \
        --config.data.h5.labels_path=/data/labels.h5 --config.data.hybrid.use_hybrid=True \
        --config.data.hybrid.images_dir=/data/images

configs/sm.py, md.py, lg.py and xl.py are this file's variants. Also the complete, commented
example of the training dynamics (docs/training.md): metadata masking with the values of the
original's documentation, null-label scheduling, selective mixing, losses and task weighting.
Options that are off here show their other settings in comments.
"""

from linnaeus_jax import config as config_lib


def get_config(variant: str = "sm"):
  if variant not in config_lib.MFORMER_V1_SIZES:
    raise ValueError(f"variant {variant!r}: one of {', '.join(config_lib.MFORMER_V1_SIZES)}")
  c = config_lib.base_config()
  config_lib.set_model_size(c, variant)
  c.data.img_size = 384
  c.data.batch_size = 64
  c.data.batch_size_val = 128
  c.data.partial.levels = True  # class 0 = unknown at every rank (needed for null scheduling)
  c.data.meta.components.ELEVATION.enabled = True  # TEMPORAL (idx 0), SPATIAL (1), ELEVATION (2)

  # Full metadata masking: per sample, every component masked with p = 1.0 -> 0.05 by 30% of
  # training (the original gave no end and fell back to 5000 steps; an end is required here).
  mm = c.schedule.meta_masking
  mm.enabled, mm.start_prob, mm.end_prob = True, 1.0, 0.05
  mm.end_fraction = 0.3  # or mm.end_steps = N (one of the two: docs/training.md#durations)
  # Partial masking: active from 10% to 90% of training; its probability ramps from step 0,
  # 0.01 -> 0.7 by 50%; a sample not fully masked gets one combination, drawn by weight.
  pm = mm.partial
  pm.enabled = True
  pm.start_fraction, pm.end_fraction = 0.1, 0.9  # or start_steps / end_steps
  pm.start_prob, pm.end_prob, pm.prob_end_fraction = 0.01, 0.7, 0.5
  pm.whitelist = (("TEMPORAL",), ("SPATIAL",), ("ELEVATION",), ("TEMPORAL", "SPATIAL"),
                  ("TEMPORAL", "ELEVATION"), ("SPATIAL", "ELEVATION"))
  pm.weights = (1.0, 1.0, 1.0, 0.5, 0.5, 0.5)

  # Null labels: keep a null label's loss with probability 0 -> 1 over the first 20% (per task,
  # per sample); train.phase1_mask_null_loss=True would exclude nulls altogether instead.
  nm = c.schedule.null_masking
  nm.enabled, nm.start_prob, nm.end_prob, nm.end_fraction = True, 0.0, 1.0, 0.2

  # Selective mixing of same-genus partners (group_levels[0]); one draw per batch.
  mix = c.schedule.mix
  mix.group_levels = ("taxa_L20",)
  mix.min_group_size = 4
  mix.exclude_null_samples, mix.null_task_keys = True, ()  # () = all tasks
  mix.prob.enabled, mix.prob.start_prob, mix.prob.end_prob = True, 0.5, 0.1
  mix.prob.end_fraction = 0.8
  mix.mixup.enabled, mix.mixup.alpha = True, 1.0
  mix.cutmix.enabled, mix.cutmix.alpha, mix.cutmix.minmax = True, 1.0, (0.3, 0.7)
  mix.switch_prob = 0.5  # CutMix instead of Mixup, when both are enabled
  mix.meta_mix = "pick"  # a mixed component is valid only if valid in both ('prefer_valid')

  # Losses: per task; TaxonomyAwareLabelSmoothing uses the taxonomy smoothing matrices.
  loss = c.loss
  loss.task_specific.train.funcs = ("TaxonomyAwareLabelSmoothing", "LabelSmoothingCrossEntropy",
                                    "CrossEntropyLoss", "CrossEntropyLoss")
  loss.task_specific.val.funcs = ("CrossEntropyLoss",) * 4
  c.model.label_smoothing = 0.1  # LabelSmoothingCrossEntropy's s
  ts = loss.taxonomy_smoothing
  ts.enabled = (True, False, False, False)
  ts.alpha, ts.beta, ts.uniform_roots, ts.fallback_to_uniform = 0.1, 1.0, True, True
  cw = loss.grad_weighting["class"]  # class weights from the train counts, applied once
  cw.method = "none"  # or 'smoothing', 'capping' (cw.cap), 'exponential', 'logarithmic'
  cw.train, cw.val = True, False
  tw = loss.grad_weighting.task
  tw.type = "gradnorm"  # or 'static' with tw.init_weights = (1.0, 1.0, 1.0, 1.0)
  tw.alpha, tw.update_interval, tw.warmup_steps = 1.5, 100, 0
  tw.exclude = ("head", "meta_")  # parameters not shared by the tasks
  tw.zero_aux_info = True  # GradNorm's re-forward without metadata
  return c
