"""mFormerV1: ConvNeXt stages 0-1, then two 2D-RoPE transformer stages with CLS and metadata
tokens, fused by the 3-scalar aggregation (docs/model.md#architecture)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linnaeus_jax import config as config_lib
from linnaeus_jax import hardware
from linnaeus_jax.models import convnext, heads, layers, meta_tokens, rope, stage


class MFormerV1(nnx.Module):

  def __init__(self, *, dims, conv_depths, rope_depths, num_heads, mlp_ratio, components,
               heads_config, task_keys, drop_path_rate=0.0, layer_scale=1e-6, theta=10000.0,
               rope_mode="rotate", attn_scale="rsqrt_head_dim", meta_missing="learned_token",
               attention_impl="xla", only_last_cls=False, in_chans=3, dtype=jnp.float32,
               scan=True, remat="none", depthwise_impl="shift", parents=None, norm_eps=1e-5,
               rngs: nnx.Rngs):
    d0, d1, d2, d3 = dims
    self.dtype = dtype
    self.task_keys = tuple(task_keys)
    self.only_last_cls = only_last_cls
    total = sum(conv_depths[:2]) + sum(rope_depths)
    dpr = [float(r) for r in np.linspace(0, drop_path_rate, total)]
    self.stem_conv = layers.conv(in_chans, d0, 4, 4, rngs, dtype)
    self.stem_norm = layers.LayerNorm(d0, 1e-6, rngs)

    def make_stage(block, depth):
      rates = [dpr.pop(0) for _ in range(depth)]
      return stage.Stage(block, rates, scan=scan, remat=remat, rngs=rngs)
    conv_block = lambda d: lambda r: convnext.ConvNeXtBlock(d, layer_scale, r, dtype,
                                                            depthwise_impl)
    self.stage0 = make_stage(conv_block(d0), conv_depths[0])
    self.down0 = convnext.Downsample(d0, d1, rngs, dtype)
    self.stage1 = make_stage(conv_block(d1), conv_depths[1])
    self.down1 = convnext.Downsample(d1, d2, rngs, dtype)

    def rope_stage(dim, depth, h, ratio):
      return make_stage(lambda r: rope.RoPEBlock(dim, h, ratio, theta, rope_mode, attn_scale,
                                                 attention_impl, r, dtype, norm_eps), depth)
    self.cls_token_1 = nnx.Param(layers.dense_init(rngs.params(), (1, 1, d2)))
    self.meta_1 = meta_tokens.MetaTokens(components, d2, meta_missing, rngs, dtype)
    self.stage3 = rope_stage(d2, rope_depths[0], num_heads[0], mlp_ratio[0])
    self.norm_1 = layers.LayerNorm(d2, 1e-5, rngs)
    if not only_last_cls:
      self.cl_1_fc = rope.Mlp(d2, d2, d3, rngs, dtype)
      self.cl_1_norm = layers.LayerNorm(d3, 1e-5, rngs)
      bound = 1.0 / np.sqrt(2.0)  # PyTorch's default Conv1d(2 -> 1, k=1) init
      self.aggregate_w = nnx.Param(jax.random.uniform(rngs.params(), (2,), jnp.float32,
                                                      -bound, bound))
      self.aggregate_b = nnx.Param(jax.random.uniform(rngs.params(), (), jnp.float32,
                                                      -bound, bound))
    self.down2 = convnext.Downsample(d2, d3, rngs, dtype)
    self.cls_token_2 = nnx.Param(layers.dense_init(rngs.params(), (1, 1, d3)))
    self.meta_2 = meta_tokens.MetaTokens(components, d3, meta_missing, rngs, dtype)
    self.stage4 = rope_stage(d3, rope_depths[1], num_heads[1], mlp_ratio[1])
    self.norm_2 = layers.LayerNorm(d3, 1e-5, rngs)
    self.final_norm = layers.LayerNorm(d3, 1e-5, rngs)
    self.head = heads.build_heads(heads_config, task_keys, d3, rngs)
    self.hierarchy = heads.Hierarchy(heads_config, task_keys, parents)

  @classmethod
  def from_config(cls, config, rngs: nnx.Rngs, parents=None) -> "MFormerV1":
    """`parents`: the taxonomy's parent links (`TaxonomyTree.parents`), for hierarchical heads."""
    m = config.model
    comps = [(name, c.dim) for name, c in config_lib.enabled_components(config)]
    dtype = hardware.compute_dtype(m.dtype)
    attention, _ = hardware.attention_impl(m.attention_impl, dtype, hardware.head_dims(config))
    return cls(dims=list(m.convnext_stages.dims), conv_depths=list(m.convnext_stages.depths),
               rope_depths=list(m.rope_stages.depths), num_heads=list(m.rope_stages.num_heads),
               mlp_ratio=list(m.rope_stages.mlp_ratio), components=comps,
               heads_config=m.classification.heads, task_keys=list(config.data.task_keys_h5),
               drop_path_rate=m.drop_path_rate,
               layer_scale=m.convnext_stages.layer_scale_init_value,
               theta=m.rope_stages.rope_theta, rope_mode=m.rope_mode, attn_scale=m.attn_scale,
               meta_missing=m.meta_missing, attention_impl=attention,
               only_last_cls=m.only_last_cls, in_chans=m.in_chans,
               dtype=jnp.dtype(dtype), scan=m.scan_blocks, remat=m.remat,
               depthwise_impl=m.depthwise_impl, parents=parents,
               norm_eps=m.rope_stages.norm_eps, rngs=rngs)

  def _rope_stage(self, blocks, x_BxHxWxD, cls, embed, meta, meta_valid, norm, train, key):
    b, h, w, d = x_BxHxWxD.shape
    extras = [jnp.broadcast_to(cls[...].astype(self.dtype), (b, 1, d))]
    if meta_valid is not None and meta_valid.shape[1]:
      extras.append(embed(meta, meta_valid, self.dtype))
    n_extra = sum(e.shape[1] for e in extras)
    x = jnp.concatenate(extras + [x_BxHxWxD.reshape(b, h * w, d)], axis=1)
    x = blocks(x, train=train, key=key, grid_hw=(h, w))
    x = norm(x)
    return x[:, 0], x[:, n_extra:].reshape(b, h, w, d)

  def features(self, image_BxHxWxC, meta, meta_valid_BxC, *, train=False, key=None):
    """Fused features (B, D3) in float32."""
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    x = self.stem_norm(self.stem_conv(image_BxHxWxC.astype(self.dtype)))
    x = self.down0(self.stage0(x, train=train, key=keys[0]))
    x = self.down1(self.stage1(x, train=train, key=keys[1]))
    cls1, x = self._rope_stage(self.stage3, x, self.cls_token_1, self.meta_1, meta,
                               meta_valid_BxC, self.norm_1, train, keys[2])
    x = self.down2(x)
    cls2, _ = self._rope_stage(self.stage4, x, self.cls_token_2, self.meta_2, meta,
                               meta_valid_BxC, self.norm_2, train, keys[3])
    if self.only_last_cls:
      return self.final_norm(cls2).astype(jnp.float32)
    cls1 = self.cl_1_norm(self.cl_1_fc(cls1))
    w = self.aggregate_w[...].astype(cls1.dtype)
    feats = w[0] * cls1 + w[1] * cls2 + self.aggregate_b[...].astype(cls1.dtype)
    return self.final_norm(feats).astype(jnp.float32)

  def __call__(self, image_BxHxWxC, meta, meta_valid_BxC, *, train=False, key=None,
               refine=True):
    """{task: logits (B, C_task) float32}; `key` drives drop path and Gumbel routing in training.

    `refine=False` returns the per-level logits without hierarchical refinement (GradNorm).
    """
    k_feats, k_heads = (None, None) if key is None else jax.random.split(key)
    feats = self.features(image_BxHxWxC, meta, meta_valid_BxC, train=train, key=k_feats)
    logits = {t: self.head[t](feats) for t in self.task_keys}
    return self.hierarchy(logits, train=train, key=k_heads) if refine else logits
