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


def _shifted_sum(x_BxHxWxC, kernel_KxKx1xC):
  """sum_ij pad(x)[:, h+i, w+j] * kernel[i, j]: one fused elementwise loop."""
  k = kernel_KxKx1xC.shape[0]
  h, w = x_BxHxWxC.shape[1:3]
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = jnp.zeros_like(x_BxHxWxC)
  for i in range(k):
    for j in range(k):
      out = out + xp[:, i:i + h, j:j + w] * kernel_KxKx1xC[i, j, 0]
  return out


def _kernel_grad_full(xp, g):
  """dkernel[i, j, c] = sum_bhw g[b, h, w, c] * xp[b, h+i, w+j, c] as K*K full reductions (what
  autodiff of `_shifted_sum` computes; XLA fuses them well on GPU/TPU)."""
  k = xp.shape[1] - g.shape[1] + 1
  h, w = g.shape[1:3]
  return jnp.stack([jnp.sum(g * xp[:, i:i + h, j:j + w], axis=(0, 1, 2), dtype=jnp.float32)
                    for i in range(k) for j in range(k)])


def _kernel_grad_blocked(xp, g):
  """The same sums on XLA's CPU: a loop over blocks of (image, up to 14 rows) that does all K*K
  sums of a block while it is in cache, each as a (1 x n) @ (n x C) product with ones (XLA's CPU
  reductions over leading axes are slow; full passes over the batch are memory-bound): about 5x
  faster than `_kernel_grad_full` there at sm's stage shapes."""
  b, h, w, c = g.shape
  k = xp.shape[1] - h + 1
  rows = max(r for r in range(1, min(h, 14) + 1) if h % r == 0)
  per_image, n = h // rows, rows * w
  ones = jnp.ones((1, n), jnp.float32)

  def body(t, acc):
    i0, r = t // per_image, (t % per_image) * rows
    xb = jax.lax.dynamic_slice(xp, (i0, r, 0, 0), (1, rows + k - 1, w + k - 1, c))
    gb = jax.lax.dynamic_slice(g, (i0, r, 0, 0), (1, rows, w, c)).astype(jnp.float32)
    sums = [ones @ (gb * xb[:, i:i + rows, j:j + w].astype(jnp.float32)).reshape(n, c)
            for i in range(k) for j in range(k)]
    return acc + jnp.concatenate(sums)
  return jax.lax.fori_loop(0, b * per_image, body, jnp.zeros((k * k, c), jnp.float32))


@jax.custom_vjp
def depthwise_shift(x_BxHxWxC, kernel_KxKx1xC):
  """'SAME' depthwise convolution as a sum of K*K shifted, scaled copies of the input.

  XLA fuses it into one elementwise loop; XLA's CPU grouped convolution inside a scanned stage
  made the sm train step 29x slower (benchmarks/RESULTS.md). The gradient is written by hand:
  the input's is the same shifted sum of the output gradient with the flipped kernel (one fused
  loop instead of K*K padded copies), the kernel's K*K sums are cache-blocked on CPU.
  """
  return _shifted_sum(x_BxHxWxC, kernel_KxKx1xC)


def _shifted_sum_once(x, kernel):
  """`_shifted_sum` divided by an elementwise 1.0 (1 + 0 x; NaN where x is not finite, where the
  taps are not finite either). XLA's CPU fusion copies the cheap-looking taps into every consumer
  of the result (the LayerNorm statistics, the normalisation, each saved residual: 5 copies in a
  scanned ConvNeXt block); a float divide counts as expensive, so the taps run once (the sm train
  step 7% faster on CPU)."""
  return _shifted_sum(x, kernel) / (1.0 + 0.0 * x)


def _depthwise_fwd(x, kernel):
  if jax.device_count() > 1:  # no platform_dependent: see _depthwise_bwd
    return _shifted_sum(x, kernel), (x, kernel)
  y = jax.lax.platform_dependent(x, kernel, cpu=_shifted_sum_once, default=_shifted_sum)
  return y, (x, kernel)


def _depthwise_bwd(res, g):
  x, kernel = res
  k = kernel.shape[0]
  g = g.astype(x.dtype)
  dx = _shifted_sum(g, kernel[::-1, ::-1])
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  # The CPU variants only with one device. The blocked loop slices the batch, which makes XLA
  # gather a sharded batch onto every device (and then run the whole backward replicated). And
  # platform_dependent is a conditional: with the kernel split (mesh.fsdp) its branch held the
  # kernel's all-gathers, which XLA's CPU runtime did not order with the step's other
  # collectives, so FSDP across processes (gloo) deadlocked in the first step.
  if jax.device_count() > 1:
    dk = _kernel_grad_full(xp, g)
  else:
    dk = jax.lax.platform_dependent(xp, g, cpu=_kernel_grad_blocked, default=_kernel_grad_full)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise_shift.defvjp(_depthwise_fwd, _depthwise_bwd)


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


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_f32(x):
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@jax.custom_vjp
def gelu(x):
  """The original's exact GELU, x/2 (1 + erf(x/sqrt 2)) (PyTorch's formula), computed in float32.

  The gradient is recomputed from x alone (cdf + x pdf): autodiff kept several activation-sized
  intermediates of erf for the backward pass (20-40% slower on XLA's CPU)."""
  return _gelu_f32(x.astype(jnp.float32)).astype(x.dtype)


def _gelu_fwd(x):
  return _gelu_f32(x.astype(jnp.float32)).astype(x.dtype), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
