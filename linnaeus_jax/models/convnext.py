"""ConvNeXt block and the LN + 2x2 strided-conv downsampling layer (NHWC)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from linnaeus_jax.models import layers


class ConvNeXtBlock(nnx.Module):
  """x + DropPath(gamma * Dense(GELU(Dense(LN(dwconv7x7(x))))))."""

  def __init__(self, dim: int, layer_scale: float, rngs: nnx.Rngs, dtype=jnp.float32,
               depthwise_impl: str = "shift"):
    self.dwconv = layers.DepthwiseConv(dim, 7, depthwise_impl, rngs, dtype)
    self.norm = layers.LayerNorm(dim, 1e-6, rngs)
    self.pwconv1 = layers.linear(dim, 4 * dim, rngs, dtype)
    self.pwconv2 = layers.linear(4 * dim, dim, rngs, dtype)
    self.gamma = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))

  def __call__(self, x_BxHxWxC, *, rate=0.0, key=None, train: bool = False):
    y = self.pwconv2(layers.gelu(self.pwconv1(self.norm(self.dwconv(x_BxHxWxC)))))
    y = y * self.gamma[...].astype(y.dtype)
    return x_BxHxWxC + layers.drop_path(y, rate, key, train)


class Downsample(nnx.Module):
  """LayerNorm(eps 1e-6) then a 2x2 stride-2 convolution."""

  def __init__(self, din: int, dout: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm = layers.LayerNorm(din, 1e-6, rngs)
    self.conv = layers.conv(din, dout, 2, 2, rngs, dtype)

  def __call__(self, x_BxHxWxC):
    return self.conv(self.norm(x_BxHxWxC))
