"""Per-sample metadata masks, drawn inside the jitted train step.

docs/training.md#metadata-masking. Each sample is fully masked (every component) with
probability p_full; otherwise, with probability p_part, one whitelisted combination of
components, drawn by weight, is masked.
Masking only clears validity flags, ANDed into the batch's own (a missing component stays
missing); the model then sees the component as missing
(docs/design.md#metadata-masking-by-validity-flags). Validation never calls this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def meta_masks(key, meta_valid_BxC, p_full, p_part=0.0, combos_KxC=(), combo_weights=()):
  """(valid_BxC, masked_BxC): the new validity flags and what the schedule masked.

  `combos_KxC`: static whitelist table (K combinations x C components, bool); `combo_weights`
  (K,) relative weights.
  """
  b, c = meta_valid_BxC.shape
  k_full, k_part, k_combo = jax.random.split(key, 3)
  full_B = jax.random.bernoulli(k_full, p_full, (b,))
  masked_BxC = jnp.broadcast_to(full_B[:, None], (b, c))
  if len(combos_KxC) and c:
    table_KxC = jnp.asarray(np.asarray(combos_KxC, bool).reshape(-1, c))
    logw_K = jnp.log(jnp.asarray(combo_weights, jnp.float32))
    part_B = jax.random.bernoulli(k_part, p_part, (b,)) & ~full_B
    combo_B = jax.random.categorical(k_combo, logw_K, shape=(b,))
    masked_BxC = masked_BxC | (part_B[:, None] & table_KxC[combo_B])
  return meta_valid_BxC & ~masked_BxC, masked_BxC

