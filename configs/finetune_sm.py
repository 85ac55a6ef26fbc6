"""mFormerV1_sm fine-tuned from ImageNet weights (docs/finetuning.md): ConvNeXt-T into the stem,
ConvNeXt stages and downsamplers, RoPE-Mixed DeiT-III-S into the RoPE stage 3, on a labels.h5
dataset at 224x224. Download the two checkpoints first (docs/finetuning.md), then:

    python -m linnaeus_jax.main --config=configs/finetune_sm.py --workdir=DIR \
        --config.data.h5.labels_path=/data/labels.h5 --config.data.hybrid.use_hybrid=True \
        --config.data.hybrid.images_dir=/data/images \
        [--config.model.init.convnext=PATH] [--config.model.init.ropevit=PATH]

The training dynamics are configs/sm.py's; this file changes what fine-tuning needs.
"""

from linnaeus_jax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "sm.py")
  c.data.img_size = 224  # the sources' resolution (RoPE also runs at other sizes)
  init = c.model.init
  init.convnext = "pretrained/convnext_tiny_1k_224_ema.pth"  # official layout; timm's works too
  init.ropevit = "pretrained/rope_mixed_deit_small_patch16_LS.bin"
  init.match_normalization = True  # ImageNet mean/std, recorded for inference
  c.model.rope_stages.norm_eps = 1e-6  # the RoPE-ViT blocks' LayerNorm eps: loaded blocks exact
  c.model.drop_path_rate = 0.1
  # Pretrained layers move less than new ones: LR x 0.8 ** (layers + 1 - layer id) per layer
  # (stem 0 ... heads 1), and the stem and first ConvNeXt stage stay frozen.
  c.optimizer.layer_decay = 0.8
  c.optimizer.freeze = "startswith:stem_ or startswith:stage0/"
  c.lr_scheduler.base_lr = 2e-4
  c.lr_scheduler.warmup_epochs = 1.0
  c.train.epochs = 30.0
  # ImageNet features need no warm start without metadata: mask less, for a shorter time.
  mm = c.schedule.meta_masking
  mm.start_prob, mm.end_fraction = 0.5, 0.2
  return c
