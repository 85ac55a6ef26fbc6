import jax.numpy as jnp
import numpy as np

from linnaeus_jax import optim

from conftest import tiny_config


def test_warmup_then_cosine_measured_from_warmup_end(small_dataset):
  c = tiny_config(small_dataset[0])
  s = c.lr_scheduler
  s.base_lr, s.warmup_lr, s.min_lr, s.warmup_steps = 1e-3, 1e-5, 1e-4, 10
  lr = optim.lr_schedule(c, total_steps=110, steps_per_epoch=10)
  np.testing.assert_allclose(float(lr(0)), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(lr(5)), 1e-5 + (1e-3 - 1e-5) * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-5)
  mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 0.5))
  np.testing.assert_allclose(float(lr(60)), mid, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-5)


def test_linear_decay_and_warmup_epochs(small_dataset):
  c = tiny_config(small_dataset[0])
  s = c.lr_scheduler
  s.name, s.base_lr, s.min_lr, s.warmup_steps, s.warmup_epochs = "linear", 1.0, 0.0, 0, 2.0
  lr = optim.lr_schedule(c, total_steps=100, steps_per_epoch=10)  # warmup = 20 steps
  np.testing.assert_allclose(float(lr(20)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), 0.5, rtol=1e-6)


def test_decay_mask_spares_biases_norms_tokens_and_freqs():
  params = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2)}, "cls_token_1": jnp.ones((1, 1, 2)),
            "attn": {"freqs": jnp.ones((2, 2, 2))}, "conv": {"kernel": jnp.ones((3, 3, 1, 2))}}
  m = optim.decay_mask(params)
  assert m["fc"]["kernel"] and m["conv"]["kernel"]
  assert not (m["fc"]["bias"] or m["norm"]["scale"] or m["cls_token_1"] or m["attn"]["freqs"])
