"""Small shared pieces: initialisers matching the original, LayerNorm in float32, DropPath."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch trunc_normal_(std=0.02, a=-2, b=2) truncates at +-2 absolute, i.e. at 100 std: a normal.
dense_init = nnx.initializers.normal(0.02)


def torch_uniform_bias(fan_in: int):
  """PyTorch's default Conv/Linear bias: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear(din: int, dout: int, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Linear:
  """Dense with the original's init (N(0, 0.02^2) kernel, zero bias), float32 parameters."""
  return nnx.Linear(din, dout, kernel_init=dense_init, bias_init=nnx.initializers.zeros,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def conv(din: int, dout: int, kernel: int, stride: int, rngs: nnx.Rngs, dtype=jnp.float32,
         groups: int = 1, padding="VALID") -> nnx.Conv:
  """Conv2d (NHWC) with the original's init: N(0, 0.02^2) kernel, PyTorch-default bias."""
  fan_in = din // groups * kernel * kernel
  return nnx.Conv(din, dout, (kernel, kernel), strides=stride, padding=padding,
                  feature_group_count=groups, kernel_init=dense_init,
                  bias_init=torch_uniform_bias(fan_in), dtype=dtype, param_dtype=jnp.float32,
                  rngs=rngs)


def depthwise_shift(x_BxHxWxC, kernel_KxKx1xC):
  """'SAME' depthwise convolution as a sum of K*K shifted, scaled copies of the input.

  XLA fuses it into one elementwise loop; XLA's CPU grouped convolution inside a scanned stage
  made the sm train step 29x slower (benchmarks/RESULTS.md).
  """
  k = kernel_KxKx1xC.shape[0]
  h, w = x_BxHxWxC.shape[1:3]
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = jnp.zeros_like(x_BxHxWxC)
  for i in range(k):
    for j in range(k):
      out = out + xp[:, i:i + h, j:j + w, :] * kernel_KxKx1xC[i, j, 0]
  return out


class DepthwiseConv(nnx.Module):
  """K x K depthwise conv, stride 1, 'SAME', with bias; parameters named like nnx.Conv's.

  impl 'shift' (`depthwise_shift`) or 'conv' (`lax.conv` with feature_group_count=C).
  """

  def __init__(self, dim: int, kernel: int, impl: str, rngs: nnx.Rngs, dtype=jnp.float32):
    if impl not in ("shift", "conv"):
      raise ValueError(f"unknown depthwise impl {impl!r}; known: shift, conv")
    self.kernel = nnx.Param(dense_init(rngs.params(), (kernel, kernel, 1, dim)))
    self.bias = nnx.Param(torch_uniform_bias(kernel * kernel)(rngs.params(), (dim,)))
    self.impl, self.dtype = impl, dtype

  def __call__(self, x_BxHxWxC):
    x = x_BxHxWxC.astype(self.dtype)
    w = self.kernel[...].astype(self.dtype)
    if self.impl == "shift":
      y = depthwise_shift(x, w)
    else:
      p = w.shape[0] // 2
      y = jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=x.shape[-1])
    return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm whose statistics are always float32; output in the input's dtype."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                              rngs=rngs)

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(x.dtype)


def drop_path(x, rate, key, train: bool):
  """Stochastic depth: drop the whole residual branch per sample, rescale by 1/keep.

  `rate` may be traced (per-block rates scanned over a stage)."""
  if not train or key is None or (isinstance(rate, float) and rate == 0.0):
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Buffer(nnx.Variable):
  """A constant carried with the model but not trained (e.g. the taxonomy matrices)."""


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # the original's exact erf GELU
