"""Train-only augmentation: AutoAugment / RandAugment on host uint8 images, random erasing on
device (float noise, so it is not quantised).

Magnitudes are the standard ones (level m in 0..10 scales each op's range; geometric ops get a
random sign), not the original's raw levels (docs/design.md#augmentation-magnitudes). Policies
(`aug.autoaug.policy`): `none`, `original` (the ImageNet AutoAugment policy), `rand-m<M>-n<N>`
(RandAugment).
Every draw comes from a generator seeded with (seed, epoch, position), so a resumed run repeats it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from linnaeus_jax import config as config_lib

_FILL = (128, 128, 128)


def _signed(v, rng):
  return v if rng.random() < 0.5 else -v


def _affine(img, matrix):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, fillcolor=_FILL)


OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(30.0 * m / 10, rng), fillcolor=_FILL),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, max(1, 8 - int(4 * m / 10))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(256 * m / 10)),
    "SolarizeAdd": lambda img, m, rng: Image.fromarray(np.where(
        np.asarray(img) < 128, np.minimum(np.asarray(img, np.int32) + int(110 * m / 10), 255),
        np.asarray(img)).astype(np.uint8)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(
        1 + _signed(0.9 * m / 10, rng)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(
        1 + _signed(0.9 * m / 10, rng)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(
        1 + _signed(0.9 * m / 10, rng)),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(0.3 * m / 10, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(0.3 * m / 10, rng), 1, 0)),
    "TranslateX": lambda img, m, rng: _affine(
        img, (1, 0, _signed(0.45 * m / 10 * img.size[0], rng), 0, 1, 0)),
    "TranslateY": lambda img, m, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(0.45 * m / 10 * img.size[1], rng))),
}

# The ImageNet policy of Cubuk et al. (2019): 25 sub-policies of two (op, probability, level).
ORIGINAL = [
    [("Posterize", 0.4, 8), ("Rotate", 0.6, 9)], [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)], [("Posterize", 0.6, 7), ("Posterize", 0.6, 6)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)], [("Equalize", 0.4, 4), ("Rotate", 0.8, 8)],
    [("Solarize", 0.6, 3), ("Equalize", 0.6, 7)], [("Posterize", 0.8, 5), ("Equalize", 1.0, 2)],
    [("Rotate", 0.2, 3), ("Solarize", 0.6, 8)], [("Equalize", 0.6, 8), ("Posterize", 0.4, 6)],
    [("Rotate", 0.8, 8), ("Color", 0.4, 0)], [("Rotate", 0.4, 9), ("Equalize", 0.6, 2)],
    [("Equalize", 0.0, 7), ("Equalize", 0.8, 8)], [("Invert", 0.6, 4), ("Equalize", 1.0, 8)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)], [("Rotate", 0.8, 8), ("Color", 1.0, 2)],
    [("Color", 0.8, 8), ("Solarize", 0.8, 7)], [("Sharpness", 0.4, 7), ("Invert", 0.6, 8)],
    [("ShearX", 0.6, 5), ("Equalize", 1.0, 9)], [("Color", 0.4, 0), ("Equalize", 0.6, 3)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)], [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Invert", 0.6, 4), ("Equalize", 1.0, 8)], [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)],
]
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateX", "TranslateY")


def apply_policy(img_HxWx3: np.ndarray, policy: str, rng: np.random.Generator) -> np.ndarray:
  """Applies one draw of `policy` to a uint8 image."""
  if policy == "none":
    return img_HxWx3
  img = Image.fromarray(img_HxWx3)
  if policy == "original":
    for op, prob, level in ORIGINAL[rng.integers(len(ORIGINAL))]:
      if rng.random() < prob:
        img = OPS[op](img, level, rng)
  else:
    m, n = config_lib.RANDAUG.fullmatch(policy).groups()
    for op in rng.choice(RAND_OPS, int(n)):
      img = OPS[op](img, float(m), rng)
  return np.asarray(img, dtype=np.uint8)


def random_erasing(key, images_BxHxWxC, prob: float, area_range=(0.02, 0.4),
                   aspect_range=(0.3, 3.3), mode: str = "pixel", mask_B=None):
  """Erases one random box per sample with probability `prob` (timm's RandomErasing, count 1).

  mode 'pixel': per-pixel U[0, 1) noise; 'rand': one U[0, 1) colour per box; 'const': zeros
  (the input range is the original's [0, 1]). Boxes are drawn for the whole batch inside jit.
  """
  b, h, w, c = images_BxHxWxC.shape
  k = jax.random.split(key, 6)
  area = jax.random.uniform(k[0], (b,), minval=area_range[0], maxval=area_range[1]) * h * w
  log_r = jax.random.uniform(k[1], (b,), minval=np.log(aspect_range[0]),
                             maxval=np.log(aspect_range[1]))
  bh = jnp.clip(jnp.round(jnp.sqrt(area * jnp.exp(log_r))), 1, h)
  bw = jnp.clip(jnp.round(jnp.sqrt(area / jnp.exp(log_r))), 1, w)
  top = jnp.floor(jax.random.uniform(k[2], (b,)) * (h - bh + 1))
  left = jnp.floor(jax.random.uniform(k[3], (b,)) * (w - bw + 1))
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))
  apply = jax.random.bernoulli(k[4], prob, (b,))
  if mask_B is not None:
    apply &= mask_B
  if mode == "pixel":
    fill = jax.random.uniform(k[5], images_BxHxWxC.shape, images_BxHxWxC.dtype)
  elif mode == "rand":
    fill = jax.random.uniform(k[5], (b, 1, 1, c), images_BxHxWxC.dtype)
  else:
    fill = jnp.zeros((), images_BxHxWxC.dtype)
  erase = (inside & apply[:, None, None])[..., None]
  return jnp.where(erase, fill, images_BxHxWxC)
