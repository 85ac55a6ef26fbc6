"""Metadata tokens: one per enabled component per RoPE stage, with explicit validity.

MetaHead = Dense(m -> D) -> ReLU -> LayerNorm -> ResNormLayer (the original's embedder).
An invalid (missing or masked) component gets a learned per-component, per-stage token
(`meta_missing='learned_token'`, default) or is embedded from zeros (`'zeros'`, the original).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linnaeus_jax.models import layers


class ResNormLayer(nnx.Module):
  """out = x + LN2(ReLU(W2 LN1(ReLU(W1 x))))."""

  def __init__(self, dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.w1 = layers.linear(dim, dim, rngs, dtype)
    self.w2 = layers.linear(dim, dim, rngs, dtype)
    self.norm_fn1 = layers.LayerNorm(dim, 1e-5, rngs)
    self.norm_fn2 = layers.LayerNorm(dim, 1e-5, rngs)

  def __call__(self, x):
    y = self.norm_fn1(jax.nn.relu(self.w1(x)))
    return x + self.norm_fn2(jax.nn.relu(self.w2(y)))


class MetaHead(nnx.Module):
  def __init__(self, din: int, dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc = layers.linear(din, dim, rngs, dtype)
    self.norm = layers.LayerNorm(dim, 1e-5, rngs)
    self.res = ResNormLayer(dim, rngs, dtype)

  def __call__(self, x_BxM):
    return self.res(self.norm(jax.nn.relu(self.fc(x_BxM))))


class MetaTokens(nnx.Module):
  """Embeds the components of one stage into tokens (B, C, D) in packing order."""

  def __init__(self, components: list[tuple[str, int]], dim: int, missing: str,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.names = tuple(name for name, _ in components)
    self.heads = nnx.Dict({name: MetaHead(m, dim, rngs, dtype) for name, m in components})
    self.missing = missing
    if missing == "learned_token" and components:
      self.missing_tokens = nnx.Param(layers.dense_init(rngs.params(), (len(components), dim)))

  def __call__(self, meta: dict, meta_valid_BxC, dtype):
    tokens = []
    for c, name in enumerate(self.names):
      valid_B1 = meta_valid_BxC[:, c:c + 1]
      x = meta[name].astype(dtype)
      if self.missing == "zeros":
        tokens.append(self.heads[name](jnp.where(valid_B1, x, 0)))
      else:
        tok = self.heads[name](x)
        tokens.append(jnp.where(valid_B1, tok, self.missing_tokens[c].astype(tok.dtype)))
    return jnp.stack(tokens, axis=1)
