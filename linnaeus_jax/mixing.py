"""Selective Mixup / CutMix between the sampler's partners, inside the train step.

docs/training.md#selective-mixing, docs/design.md#selective-mixing: the sampler puts partners
of one taxonomic group at batch positions (2i, 2i+1) with `pair_ok`; one probability draw per
batch (`apply`), one lambda per batch, CutMix instead of Mixup with `switch_prob` when both are
enabled. Samples without a partner are untouched. Targets are mixed by the loss from (lam_B,
partner_B). Metadata are never averaged: a per-sample coin picks the source, and with
`meta_mix='pick'` a mixed component is valid only if valid in both samples (a masked component
stays masked); 'prefer_valid' takes whichever side is valid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from linnaeus_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class MixConfig:
  mixup: bool
  cutmix: bool
  mixup_alpha: float = 1.0
  cutmix_alpha: float = 1.0
  cutmix_minmax: tuple[float, ...] = ()
  switch_prob: float = 0.5
  meta_mix: str = "pick"
  components: tuple[str, ...] = ()  # metadata names in packing (meta_valid column) order

  @classmethod
  def from_config(cls, config) -> "MixConfig":
    m = config.schedule.mix
    return cls(bool(m.mixup.enabled), bool(m.cutmix.enabled), float(m.mixup.alpha),
               float(m.cutmix.alpha), tuple(float(x) for x in m.cutmix.minmax),
               float(m.switch_prob), m.meta_mix,
               tuple(n for n, _ in config_lib.enabled_components(config)))

  @property
  def active(self) -> bool:
    return self.mixup or self.cutmix


def partner(x):
  """x[i ^ 1]: swaps the members of each adjacent pair (stays within a device's shard)."""
  b = x.shape[0]
  return x.reshape((b // 2, 2) + x.shape[1:])[:, ::-1].reshape(x.shape)


def cutmix_box(key, lam, h: int, w: int):
  """(box_HxW bool, lam_adjusted): a box of side ratio sqrt(1 - lam), uniform centre, clipped."""
  k_y, k_x = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, h)
  cx = jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return box, 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)


def mix_batch(key, cfg: MixConfig, p_mix, image_BxHxWxC, meta: dict, meta_valid_BxC, pair_ok_B):
  """Returns (image, meta, meta_valid, lam_B, partner_B, applied).

  lam_B is the weight of a sample's own target (1 where unmixed); partner_B = index ^ 1.
  """
  b, h, w = image_BxHxWxC.shape[:3]
  partner_B = jnp.arange(b) ^ 1
  k_apply, k_switch, k_lam, k_box, k_coin = jax.random.split(key, 5)
  applied = jax.random.uniform(k_apply) < p_mix
  use_cut = jnp.asarray(cfg.cutmix and not cfg.mixup)
  if cfg.cutmix and cfg.mixup:
    use_cut = jax.random.uniform(k_switch) < cfg.switch_prob
  alpha = jnp.where(use_cut, cfg.cutmix_alpha, cfg.mixup_alpha)
  lam = jax.random.beta(k_lam, alpha, alpha)
  if cfg.cutmix_minmax:
    lo, hi = cfg.cutmix_minmax
    lam = jnp.where(use_cut, lo + (hi - lo) * lam, lam)
  box_HxW, lam_cut = cutmix_box(k_box, lam, h, w)
  mixed_B = applied & pair_ok_B

  other = partner(image_BxHxWxC)
  blended = lam * image_BxHxWxC + (1.0 - lam) * other
  cut = jnp.where(box_HxW[None, :, :, None], other, image_BxHxWxC)
  new_image = jnp.where(use_cut, cut, blended).astype(image_BxHxWxC.dtype)
  image = jnp.where(mixed_B[:, None, None, None], new_image, image_BxHxWxC)
  lam_B = jnp.where(mixed_B, jnp.where(use_cut, lam_cut, lam), 1.0)

  own_B = jax.random.bernoulli(k_coin, 0.5, (b,))  # the source of each sample's metadata
  valid_p = partner(meta_valid_BxC)
  if cfg.meta_mix == "prefer_valid":
    take_own_BxC = jnp.where(meta_valid_BxC & valid_p, own_B[:, None], meta_valid_BxC)
    new_valid = meta_valid_BxC | valid_p
  else:
    take_own_BxC = jnp.broadcast_to(own_B[:, None], meta_valid_BxC.shape)
    new_valid = meta_valid_BxC & valid_p
  meta_out = dict(meta)
  for c, name in enumerate(cfg.components):
    v = meta[name]
    picked = jnp.where(take_own_BxC[:, c:c + 1], v, partner(v))
    meta_out[name] = jnp.where(mixed_B[:, None], picked, v)
  valid = jnp.where(mixed_B[:, None], new_valid, meta_valid_BxC)
  return image, meta_out, valid, lam_B, partner_B, applied
