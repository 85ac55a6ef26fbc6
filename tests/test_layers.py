import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax.models import layers


def test_depthwise_shift_equals_grouped_convolution_and_by_hand():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 11, 5))
  shift = layers.DepthwiseConv(5, 7, "shift", nnx.Rngs(1))
  conv = layers.DepthwiseConv(5, 7, "conv", nnx.Rngs(1))
  np.testing.assert_array_equal(shift.kernel[...], conv.kernel[...])  # same init, same names
  np.testing.assert_allclose(shift(x), conv(x), rtol=1e-5, atol=1e-5)
  # One output pixel by hand: zero padding of 3, the kernel centred on (row 0, col 4).
  w, b = np.asarray(shift.kernel[...])[:, :, 0], np.asarray(shift.bias[...])
  xp = np.pad(np.asarray(x), ((0, 0), (3, 3), (3, 3), (0, 0)))
  expect = (xp[1, 0:7, 4:11] * w).sum((0, 1)) + b
  np.testing.assert_allclose(shift(x)[1, 0, 4], expect, rtol=1e-5, atol=1e-6)


def test_layer_norm_statistics_in_float32():
  ln = layers.LayerNorm(4, 1e-6, nnx.Rngs(0))
  x = jnp.array([[1.0, 2.0, 3.0, 1000.0]], jnp.bfloat16)
  y = ln(x)
  assert y.dtype == jnp.bfloat16
  xf = np.array([1.0, 2.0, 3.0, 1000.0])
  np.testing.assert_allclose(np.asarray(y, np.float32)[0], (xf - xf.mean()) / np.sqrt(xf.var()),
                             rtol=1e-2)


def test_depthwise_shift_gradients_equal_the_grouped_convolutions():
  """The hand-written backward (flipped-kernel shifted sum; blocked kernel sums on CPU) against
  autodiff of XLA's grouped convolution, for the input, the kernel and a cotangent."""
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(kx, (3, 10, 12, 6))  # 10 rows: blocks of 5, 2 per image
  kernel = jax.random.normal(kk, (7, 7, 1, 6))
  g = jax.random.normal(kg, x.shape)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6)
  loss = lambda f: jax.jit(jax.grad(lambda x, k: (f(x, k) * g).sum(), argnums=(0, 1)))
  for got, want in zip(loss(layers.depthwise_shift)(x, kernel), loss(conv)(x, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  dx, dk = loss(layers.depthwise_shift)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert dx.dtype == dk.dtype == jnp.bfloat16


def test_gelu_is_the_exact_erf_gelu_with_its_derivative():
  x = jnp.linspace(-6.0, 6.0, 101)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x),
                             jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x),
                             atol=1e-6)
