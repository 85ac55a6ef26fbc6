"""Reference outputs of the PyTorch original for tests/test_convert_torch.py's parity test.

Run with a Python that has torch (CPU), yacs, pyyaml and termcolor, never linnaeus_jax's venv
(torch is not our dependency), against a checkout of polli-labs/linnaeus kept outside this
repository:

    python tests/make_torch_reference.py --original=/path/to/linnaeus --out=/tmp/torch_ref
    LINNAEUS_TORCH_REFERENCE=/tmp/torch_ref .venv/bin/python -m pytest tests/test_convert_torch.py -k parity

It builds a seeded random-init original mFormerV1 sm (CPU, float32, plain attention path) the way
the original's main.py builds its config (defaults, experiment keys, MODEL.BASE
mFormerV1_sm.yaml), perturbs the parameters that default init leaves trivial (LayerScale 1e-6,
zero biases, unit LayerNorm weights: they would hide bugs), and writes pytorch_model.bin,
keys.txt, config_used.yaml and reference.npz (inputs, logits with metadata and with zeroed
metadata, features). Two runs give identical files.
"""
import argparse
import os
import sys

import numpy as np
import torch
from yacs.config import CfgNode as CN

get_default_config = build_model = load_model_base_config = None  # from the checkout, in main()

TASKS = ["taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40"]
NUM_CLASSES = {"taxa_L10": 17, "taxa_L20": 9, "taxa_L30": 5, "taxa_L40": 3}
# (name, dim, IDX) -- IDX defines packing order of the concatenated meta vector
META = [("TEMPORAL", 4, 0), ("SPATIAL", 3, 1), ("ELEVATION", 10, 2)]


def make_config(img_size: int) -> CN:
  cfg = get_default_config()
  exp = CN(new_allowed=True)
  exp.MODEL = CN(new_allowed=True)
  exp.MODEL.TYPE = "mFormerV1"
  exp.MODEL.NAME = "mFormerV1_sm"
  exp.MODEL.BASE = ["configs/model/archs/mFormerV1/mFormerV1_sm.yaml"]
  exp.MODEL.IMG_SIZE = img_size
  exp.MODEL.USE_FLASH_ATTN = False  # force the plain (float32 matmul + softmax) attention path
  exp.MODEL.PRETRAINED = None
  exp.MODEL.CLASSIFICATION = CN(new_allowed=True)
  exp.MODEL.CLASSIFICATION.HEADS = CN(new_allowed=True)
  for t in TASKS:
    exp.MODEL.CLASSIFICATION.HEADS[t] = CN({"TYPE": "Linear", "USE_BIAS": True})
  cfg.defrost()
  # MODEL section has keys not in defaults (USE_FLASH_ATTN) -> set directly, like
  # merge_from_other_cfg would for the experiment yaml's known keys.
  for k, v in exp.MODEL.items():
    cfg.MODEL[k] = v
  cfg.DATA.IMG_SIZE = img_size
  cfg.DATA.TASK_KEYS_H5 = list(TASKS)
  cfg.DATA.META.ACTIVE = True
  for name, dim, idx in META:
    cfg.DATA.META.COMPONENTS[name].ENABLED = True
    cfg.DATA.META.COMPONENTS[name].DIM = dim
    cfg.DATA.META.COMPONENTS[name].IDX = idx
  cfg = load_model_base_config(cfg)  # merges mFormerV1_sm.yaml under the experiment MODEL keys
  cfg.TRAIN.GRADIENT_CHECKPOINTING.ENABLED_NORMAL_STEPS = False
  cfg.freeze()
  return cfg


@torch.no_grad()
def perturb_(model: torch.nn.Module, gen: torch.Generator):
  """Make every parameter matter numerically (default init has ConvNeXt LayerScale
  gamma=1e-6, zero biases, unit LN weights, which would hide bugs in a parity test).
  Deterministic given `gen`; iterates named_parameters() in state-dict order."""
  norm_weights = set()
  for mname, mod in model.named_modules():
    if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__ == "LayerNormChannelsFirst":
      norm_weights.add(f"{mname}.weight")
  for name, p in model.named_parameters():
    if name.endswith(".gamma"):  # ConvNeXt LayerScale
      p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
    elif name in norm_weights:
      p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    elif name.endswith("bias"):
      p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    elif name.endswith(".freqs"):
      p.add_(0.01 * torch.randn(p.shape, generator=gen))
    elif name.startswith("aggregate."):
      p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    # other weights keep their trunc_normal(std=0.02) / PyTorch-default init


def main():
  global get_default_config, build_model, load_model_base_config
  ap = argparse.ArgumentParser()
  ap.add_argument("--original", required=True, help="checkout of polli-labs/linnaeus")
  ap.add_argument("--out", required=True)
  ap.add_argument("--img-size", type=int, default=224)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-perturb", action="store_true")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  sys.path.insert(0, os.path.abspath(args.original))
  os.environ["CONFIG_DIR"] = os.path.abspath(args.original)  # MODEL.BASE paths resolve here
  from linnaeus.config import get_default_config  # pylint: disable=import-outside-toplevel
  from linnaeus.models import build_model  # pylint: disable=import-outside-toplevel
  from linnaeus.utils.config_utils import load_model_base_config  # pylint: disable=import-outside-toplevel

  torch.manual_seed(args.seed)
  torch.set_num_threads(2)
  cfg = make_config(args.img_size)
  model = build_model(cfg, num_classes=dict(NUM_CLASSES), taxonomy_tree=None)
  model = model.float().eval()
  if not args.no_perturb:
    perturb_(model, torch.Generator().manual_seed(args.seed + 1))

  sd = model.state_dict()
  torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))
  with open(os.path.join(args.out, "keys.txt"), "w") as f:
    for k, v in sd.items():
      f.write(f"{k}\t{tuple(v.shape)}\t{str(v.dtype).replace('torch.', '')}\n")
  with open(os.path.join(args.out, "config_used.yaml"), "w") as f:
    f.write(cfg.dump())

  # Fixed inputs
  g = torch.Generator().manual_seed(1234)
  B = 2
  images = torch.randn(B, 3, args.img_size, args.img_size, generator=g, dtype=torch.float32)
  metas = {name: torch.randn(B, dim, generator=g, dtype=torch.float32) for name, dim, _ in META}
  meta_cat = torch.cat([metas[n] for n, _, _ in sorted(META, key=lambda m: m[2])], dim=1)
  # second meta case: all components zeroed (how the data pipeline represents missing/masked meta)
  meta_zero = torch.zeros_like(meta_cat)

  with torch.no_grad():
    out = model(images, meta_cat)
    out_zero = model(images, meta_zero)
    feats = model.forward_features(images, meta_cat)
  assert list(out.keys()) == TASKS, list(out.keys())

  arrs = {
    "images_nchw": images.numpy(),
    "images_nhwc": images.permute(0, 2, 3, 1).contiguous().numpy(),
    "meta": meta_cat.numpy(),  # (B, 17) = [TEMPORAL(4) | SPATIAL(3) | ELEVATION(10)]
    "meta_zero": meta_zero.numpy(),
    "features": feats.numpy(),  # (B, 768) output of forward_features (after final_norm)
    "img_size": np.array(args.img_size),
    "task_keys": np.array(TASKS),
    "meta_components": np.array([n for n, _, _ in META]),
    "meta_dims": np.array([d for _, d, _ in META]),
  }
  for n, _, _ in META:
    arrs[f"meta_{n}"] = metas[n].numpy()
  for t in TASKS:
    arrs[f"logits_{t}"] = out[t].numpy()
    arrs[f"logits_metazero_{t}"] = out_zero[t].numpy()
  np.savez(os.path.join(args.out, "reference.npz"), **arrs)

  n_params = sum(p.numel() for p in model.parameters())
  print(f"params={n_params:,} state_dict_keys={len(sd)} img_size={args.img_size}")
  for t in TASKS:
    print(t, out[t].shape, out[t][0, :5].tolist())


if __name__ == "__main__":
  main()
