"""A stage of identical residual blocks: a Python loop, or `nnx.scan` over stacked parameters.

Scanning compiles one block instead of `depth` copies (xl stage 3 has 22); `remat` recomputes
each block's activations in the backward pass instead of storing them. Per-block drop-path rates
and keys are scanned inputs, so both layouts compute the same function of the same weights.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Stage(nnx.Module):
  """`depth` blocks made by `make_block(rngs)`, called as `block(x, rate, key, train, **kw)`."""

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], rates: list[float], *,
               scan: bool, remat: str, rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}")
    self.rates, self.scan, self.remat = tuple(rates), scan, remat
    if scan:
      @nnx.split_rngs(splits=len(rates))
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(r):
        return make_block(r)
      self.blocks = create(rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in rates])

  def __call__(self, x, *, train: bool = False, key=None, **kwargs):
    depth = len(self.rates)
    keys = jax.random.split(key if key is not None else jax.random.PRNGKey(0), depth)
    use_keys = key is not None

    def body(block, x, rate, k):
      return block(x, rate=rate, key=k if use_keys else None, train=train, **kwargs)
    if self.remat != "none":
      body = nnx.remat(body, policy=REMAT_POLICIES[self.remat])
    if not self.scan:
      for i, block in enumerate(self.blocks):
        x = body(block, x, self.rates[i], keys[i])
      return x

    def step(block, x, rate, k):
      return body(block, x, rate, k)
    return nnx.scan(step, in_axes=(0, nnx.Carry, 0, 0), out_axes=nnx.Carry)(
        self.blocks, x, jnp.asarray(self.rates, jnp.float32), keys)
