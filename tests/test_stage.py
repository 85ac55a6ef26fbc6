import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linnaeus_jax import models

from conftest import tiny_config


def _unstack(scanned: dict, unrolled: dict) -> dict:
  """The scanned model's weights in the unrolled layout: block i of a stage = slice i."""
  out = {}
  for k, v in unrolled.items():
    if k == "blocks":
      out[k] = {i: jax.tree.map(lambda x, i=i: x[i], scanned[k]) for i in v}
    elif isinstance(v, dict):
      out[k] = _unstack(scanned[k], v)
    else:
      out[k] = scanned[k]
  return out


@pytest.mark.slow
def test_scanned_and_unrolled_stages_compute_the_same_function(small_dataset):
  """Same weights: same logits (eval), and with remat the same drop-path draws and gradients."""
  c = tiny_config(small_dataset[0])
  c.model.convnext_stages.depths = [2, 2]
  c.model.rope_stages.depths = [3, 2]
  c.model.remat = "full"
  for t, n in zip(c.data.task_keys_h5, (5, 4, 3, 2)):
    c.model.classification.heads[t].num_classes = n
  g_s, p_s = nnx.split(models.build(c, nnx.Rngs(0)))
  c.model.scan_blocks, c.model.remat = False, "none"
  g_u, p_u = nnx.split(models.build(c, nnx.Rngs(0)))
  p_s, p_u = nnx.to_pure_dict(p_s), nnx.to_pure_dict(p_u)
  assert p_s["stage3"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 3  # really stacked
  p_u = _unstack(p_s, p_u)

  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  image = jax.random.uniform(ks[0], (4, 32, 32, 3))
  meta = {"TEMPORAL": jax.random.normal(ks[1], (4, 2)),
          "SPATIAL": jax.random.normal(ks[2], (4, 3)),
          "ELEVATION": jax.random.normal(ks[3], (4, 10))}
  valid = jnp.ones((4, 3), bool)

  def forward(g, p):
    return jax.jit(lambda p: nnx.merge(g, p)(image, meta, valid))(p)

  def train_grad(g, p):
    def loss(p):
      out = nnx.merge(g, p)(image, meta, valid, train=True, key=jax.random.PRNGKey(7))
      return sum(jnp.sum(v ** 2) for v in out.values())
    return jax.jit(jax.value_and_grad(loss))(p)

  out_s, out_u = forward(g_s, p_s), forward(g_u, p_u)
  for t in out_s:
    np.testing.assert_allclose(out_s[t], out_u[t], rtol=1e-4, atol=1e-5)
  (l_s, grad_s), (l_u, grad_u) = train_grad(g_s, p_s), train_grad(g_u, p_u)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-4)  # drop path (rate 0.1) draws the same masks
  for stage in ("stage0", "stage3"):
    for a, b in zip(jax.tree.leaves(_unstack(grad_s, grad_u)[stage]),
                    jax.tree.leaves(grad_u[stage])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
