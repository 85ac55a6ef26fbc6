"""Image decoding and normalisation shared by training and inference (Decision 11).

Host side: decode any image to RGB uint8 and squash it to S x S with area interpolation (PIL BOX,
the equivalent of the original's cv2 INTER_AREA when shrinking); no crop, no aspect preservation.
Device side: uint8 -> float32 in [0, 1], optionally standardised with a recorded mean/std.
"""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
from PIL import Image


def to_rgb_uint8(img, size: int) -> np.ndarray:
  """PIL image, HWC uint8 array, encoded bytes or a path -> (size, size, 3) uint8 RGB."""
  if isinstance(img, (bytes, bytearray)):
    img = Image.open(io.BytesIO(img))
  elif isinstance(img, str):
    with Image.open(img) as f:
      f.load()
      img = f
  elif isinstance(img, np.ndarray):
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:
      img = img[..., :3]
    if img.shape[:2] == (size, size) and img.dtype == np.uint8:
      return np.ascontiguousarray(img)
    img = Image.fromarray(img.astype(np.uint8))
  if img.mode != "RGB":
    img = img.convert("RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BOX)
  return np.asarray(img, dtype=np.uint8)


def normalize(image_BxHxWx3, mean=None, std=None):
  """uint8 -> float32 [0, 1] (the original's training input), then (x - mean) / std if given."""
  x = image_BxHxWx3.astype(jnp.float32) / 255.0
  if mean is not None:
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x
