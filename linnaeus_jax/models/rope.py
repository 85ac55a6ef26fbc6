"""2D RoPE with mixed learned frequencies and the pre-norm RoPE transformer block.

Per block a parameter `freqs` (2, heads, head_dim/2): freqs[0, h, j] = w_j cos(a_h),
freqs[1, h, j] = w_j sin(a_h), w_j = theta^(-2j/head_dim), one random direction a_h per head.
Image token n at column x = n % W, row y = n // W gets angle x*freqs[0] + y*freqs[1] on its
interleaved channel pairs (2j, 2j+1). Only image tokens are rotated, never the CLS/metadata ones.
`rope_mode='cos_only'` reproduces the original's defect (q and k scaled by cos instead of rotated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from linnaeus_jax.models import layers


def init_mixed_freqs(key, heads: int, head_dim: int, theta: float) -> jax.Array:
  mags_P = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle_H = jax.random.uniform(key, (heads,), jnp.float32, 0.0, 2 * jnp.pi)
  return jnp.stack([jnp.cos(angle_H)[:, None] * mags_P, jnp.sin(angle_H)[:, None] * mags_P])


def grid_angles(freqs_2xHxP, height: int, width: int) -> jax.Array:
  """Angles (height*width, heads, P) in float32 for tokens in raster order."""
  n = jnp.arange(height * width)
  x, y = (n % width).astype(jnp.float32), (n // width).astype(jnp.float32)
  f = freqs_2xHxP.astype(jnp.float32)
  return x[:, None, None] * f[0][None] + y[:, None, None] * f[1][None]


def _sum_batch(a):
  """sum over axis 0 in float32: a (1 x B) @ (B x rest) product on XLA's CPU, whose reductions
  over a leading axis are 20x slower; a plain sum elsewhere."""
  def cpu(a):
    b = a.shape[0]
    ones = jnp.ones((1, b), jnp.float32)
    return (ones @ a.reshape(b, -1).astype(jnp.float32)).reshape(a.shape[1:])
  return jax.lax.platform_dependent(a, cpu=cpu,
                                    default=lambda a: jnp.sum(a.astype(jnp.float32), axis=0))


def _pairs(x):
  return x[..., 0::2], x[..., 1::2]


def _interleave(even, odd, shape):
  return jnp.stack([even, odd], axis=-1).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rotate(x, cos, sin, mode):
  """x (B, N, H, D) float32 rotated by angles given as cos, sin (N, H, D/2)."""
  xe, xo = _pairs(x)
  if mode == "rotate":
    return _interleave(xe * cos - xo * sin, xe * sin + xo * cos, x.shape)
  return _interleave(xe * cos, xo * cos, x.shape)


def _rotate_fwd(x, cos, sin, mode):
  return _rotate(x, cos, sin, mode), (x, cos, sin)


def _rotate_bwd(mode, res, g):
  """Autodiff's gradient, with the batch sums of the cos/sin gradients done by `_sum_batch`."""
  x, cos, sin = res
  (xe, xo), (ge, go) = _pairs(x), _pairs(g)
  dcos = _sum_batch(ge * xe + go * xo).astype(cos.dtype)
  if mode == "rotate":
    dx = _interleave(ge * cos + go * sin, go * cos - ge * sin, x.shape)
    dsin = _sum_batch(go * xe - ge * xo).astype(sin.dtype)
  else:
    dx = _interleave(ge * cos, go * cos, x.shape)
    dsin = jnp.zeros_like(sin)
  return dx, dcos, dsin


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def apply_rope(x_BxNxHxD, angles_NxHxP, mode: str = "rotate"):
  """Rotates interleaved pairs of the N tokens of x by the given angles (angle 0: unchanged)."""
  if mode not in ("rotate", "cos_only"):
    raise ValueError(f"unknown rope_mode {mode!r}")
  dtype = x_BxNxHxD.dtype
  y = _rotate(x_BxNxHxD.astype(jnp.float32), jnp.cos(angles_NxHxP), jnp.sin(angles_NxHxP), mode)
  return y.astype(dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with 2D RoPE on the image tokens (the last H*W of the sequence)."""

  def __init__(self, dim: int, heads: int, theta: float, rope_mode: str, attn_scale: str,
               impl: str, rngs: nnx.Rngs, dtype=jnp.float32):
    self.heads, self.head_dim = heads, dim // heads
    self.qkv = layers.linear(dim, 3 * dim, rngs, dtype)
    self.proj = layers.linear(dim, dim, rngs, dtype)
    self.freqs = nnx.Param(init_mixed_freqs(rngs.params(), heads, self.head_dim, theta))
    self.rope_mode = rope_mode
    self.scale = self.head_dim ** -0.5 if attn_scale == "rsqrt_head_dim" else 1.0 / self.head_dim
    self.impl = None if impl == "xla" else impl

  def __call__(self, x_BxTxD, grid_hw: tuple[int, int]):
    b, t, d = x_BxTxD.shape
    n_img = grid_hw[0] * grid_hw[1]
    qkv = self.qkv(x_BxTxD).reshape(b, t, 3, self.heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Angle 0 (cos 1, sin 0: exactly unchanged) for the leading CLS/metadata tokens: one
    # elementwise pass over q and k instead of slicing and scattering back the image tokens.
    angles = jnp.pad(grid_angles(self.freqs[...], *grid_hw), ((t - n_img, 0), (0, 0), (0, 0)))
    q = apply_rope(q, angles, self.rope_mode)
    k = apply_rope(k, angles, self.rope_mode)
    out = jax.nn.dot_product_attention(q, k, v, scale=self.scale, implementation=self.impl)
    return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  def __init__(self, din: int, hidden: int, dout: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = layers.linear(din, hidden, rngs, dtype)
    self.fc2 = layers.linear(hidden, dout, rngs, dtype)

  def __call__(self, x):
    return self.fc2(layers.gelu(self.fc1(x)))


class RoPEBlock(nnx.Module):
  """x + DropPath(Attn(LN(x))); x + DropPath(Mlp(LN(x))), no LayerScale (a pretrained one is
  folded into proj / fc2). LN eps 1e-5 like the original; RoPE-ViT's blocks use 1e-6."""

  def __init__(self, dim: int, heads: int, mlp_ratio: float, theta: float, rope_mode: str,
               attn_scale: str, impl: str, rngs: nnx.Rngs, dtype=jnp.float32,
               norm_eps: float = 1e-5):
    self.norm1 = layers.LayerNorm(dim, norm_eps, rngs)
    self.attn = Attention(dim, heads, theta, rope_mode, attn_scale, impl, rngs, dtype)
    self.norm2 = layers.LayerNorm(dim, norm_eps, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, rngs, dtype)

  def __call__(self, x_BxTxD, *, grid_hw, rate=0.0, key=None, train: bool = False):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = x_BxTxD + layers.drop_path(self.attn(self.norm1(x_BxTxD), grid_hw), rate, k1, train)
    return x + layers.drop_path(self.mlp(self.norm2(x)), rate, k2, train)
