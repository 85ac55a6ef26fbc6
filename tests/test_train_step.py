"""The train step's pieces, each against a closed form or a hand-made case, and the whole step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linnaeus_jax import optim, schedules
from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax import state as state_lib
from linnaeus_jax import train_step
from linnaeus_jax.data import pipeline

from conftest import tiny_config


def _step_setup(small_dataset, **train_kw):
  """A tiny config's state, a jitted train step and a real 16-sample batch."""
  c = tiny_config(small_dataset[0], **train_kw)
  c.model.drop_path_rate = 0.0
  c.schedule.meta_masking.enabled = False
  c, data = resolve_lib.resolve(c)
  tx, lrs = optim.build(c, 100, 10)
  graphdef, init = state_lib.create_state(c, data.taxonomy.parents)
  state = jax.jit(lambda: init(tx))()
  step = jax.jit(train_step.make_train_step(graphdef, tx, train_step.StepConfig.from_config(c),
                                            lrs, schedules.Schedules.from_config(c, 100, 10)))
  batch = next(iter(pipeline.train_dataset(data, c, 100, 0, 1)))
  return c, state, step, batch, state_lib.loss_constants(c, data)


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_large_batch(small_dataset):
  _, state, step1, batch, consts = _step_setup(small_dataset)
  _, _, step2, _, _ = _step_setup(small_dataset, accumulation_steps=2)
  # Without padding or excluded samples every micro-batch has the same weight: mean of the
  # micro-batch means = the mean over the batch.
  assert np.asarray(batch["example_mask"]).all()
  a_state, a = step1(jax.tree.map(np.asarray, state), batch, consts)
  b_state, b = step2(jax.tree.map(np.asarray, state), batch, consts)
  np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(b["grad_norm"]), float(a["grad_norm"]), rtol=1e-4)
  assert float(b["acc"]["counts"]["n"]) == float(a["acc"]["counts"]["n"]) == 16
  for x, y in zip(jax.tree.leaves(b_state.params), jax.tree.leaves(a_state.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

@pytest.mark.slow
def test_a_nan_batch_skips_the_update_and_is_counted(small_dataset):
  _, state, step, batch, consts = _step_setup(small_dataset)
  bad = dict(batch, meta={k: np.full_like(np.asarray(v), np.nan) for k, v in batch["meta"].items()})
  before = jax.tree.map(np.asarray, state)
  after, out = step(jax.tree.map(np.asarray, state), bad, consts)
  assert not np.isfinite(float(out["loss"]))
  for x, y in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params)):
    np.testing.assert_array_equal(x, y)
  assert int(after.nonfinite_streak) == 1 and int(out["nonfinite_skips"]) == 1
  assert int(after.step) == 1  # the step still advances (the LR schedule with it)
  after, out = step(after, batch, consts)
  assert np.isfinite(float(out["loss"])) and int(after.nonfinite_streak) == 0
  assert int(after.nonfinite_skips) == 1


def test_split_micro_keeps_pairs_and_first_micro_matches_accumulation():
  x = jnp.arange(16)
  micro = train_step.split_micro(x, 4)
  assert micro.shape == (4, 4)
  for row in np.asarray(micro):
    assert all(row[i] // 2 == row[i + 1] // 2 for i in range(0, 4, 2))  # partners together
  assert sorted(np.asarray(micro).ravel()) == list(range(16))
  seen = []

  def fn(b, k):
    seen.append((b["x"], k))
    return jnp.sum(b["x"]), {"g": b["x"].astype(jnp.float32)}, jnp.ones(2), {"n": jnp.int32(1)}
  key = jax.random.PRNGKey(7)
  loss, grads, task_T, sums = train_step.accumulate_grads(fn, {"x": x}, key, 4)
  assert float(loss) == np.sum(np.arange(16)) / 4  # averaged over micro-batches
  np.testing.assert_allclose(grads["g"], np.asarray(micro, np.float32).mean(0))
  np.testing.assert_allclose(task_T, [1.0, 1.0])
  assert int(sums["n"]) == 4  # summed
  first, first_key = train_step.first_micro({"x": x}, key, 4)
  np.testing.assert_array_equal(first["x"], micro[0])
  np.testing.assert_array_equal(first_key, jax.random.fold_in(key, 0))
  b1, k1 = train_step.first_micro({"x": x}, key, 1)
  assert b1["x"] is x and k1 is key


def test_prepare_batch_masks_by_the_schedule(small_dataset):
  c = tiny_config(small_dataset[0])
  c, data = resolve_lib.resolve(c)
  cfg = train_step.StepConfig.from_config(c)
  scheds = schedules.Schedules.from_config(c, 100, 10)
  batch = jax.tree.map(jnp.asarray, next(iter(pipeline.train_dataset(data, c, 100, 0, 1))))
  key = jax.random.PRNGKey(0)
  base = {"schedule/partial_mask_prob": 0.0, "schedule/mix_prob": 0.0}
  on = train_step.prepare_batch(cfg, scheds, batch, key, {**base, "schedule/meta_mask_prob": 1.0})
  assert not np.asarray(on.meta_valid).any() and np.asarray(on.masked_BxC).all()
  off = train_step.prepare_batch(cfg, scheds, batch, key, {**base, "schedule/meta_mask_prob": 0.0})
  np.testing.assert_array_equal(off.meta_valid, batch["meta_valid"])
  assert not np.asarray(off.masked_BxC).any() and off.mix == (None, None)
  # Pixels are normalised: uint8 in, float [0, 1] out (data.image_mean/std are ()).
  assert off.image.dtype == jnp.float32
  np.testing.assert_allclose(off.image, np.asarray(batch["image"], np.float32) / 255, atol=1e-7)


MEAN, STD = (0.5, 0.25, 0.125), (0.2, 0.4, 0.8)


def test_prepare_batch_standardises_with_the_configs_mean_and_std(small_dataset):
  c = tiny_config(small_dataset[0])
  c.data.image_mean, c.data.image_std = MEAN, STD
  c, data = resolve_lib.resolve(c)
  cfg = train_step.StepConfig.from_config(c)
  assert (cfg.image_mean, cfg.image_std) == (MEAN, STD)
  hash(cfg)  # still a static jit argument
  scheds = schedules.Schedules.from_config(c, 100, 10)
  batch = jax.tree.map(jnp.asarray, next(iter(pipeline.train_dataset(data, c, 100, 0, 1))))
  sched = {"schedule/partial_mask_prob": 0.0, "schedule/mix_prob": 0.0,
           "schedule/meta_mask_prob": 0.0}
  key = jax.random.PRNGKey(0)
  x = np.asarray(batch["image"], np.float32) / 255
  got = train_step.prepare_batch(cfg, scheds, batch, key, sched).image
  np.testing.assert_allclose(got, (x - np.array(MEAN)) / np.array(STD), rtol=1e-6, atol=1e-6)
  plain = dataclasses.replace(cfg, image_mean=None, image_std=None)
  np.testing.assert_allclose(train_step.prepare_batch(plain, scheds, batch, key, sched).image, x,
                             atol=1e-7)
  assert np.abs(np.asarray(got) - x).max() > 0.5


def test_losses_and_counts_mask_nulls_in_phase_1_for_train_and_eval():
  tasks = ("a",)
  cfg = train_step.StepConfig(tasks=tasks, train_funcs=("CrossEntropyLoss",),
                              val_funcs=("CrossEntropyLoss",), null_class=True, mask_nulls=True)
  logits = {"a": jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8],
                                    [0.3, 0.3, 0.4]]))}
  batch = {"labels": {"a": jnp.array([0, 1, 2, 1])},
           "example_mask": jnp.array([True, True, True, False])}  # row 0 null, row 3 padding
  for train in (True, False):
    per_task, counts = train_step.losses_and_counts(cfg, logits, batch, {}, train=train)
    want = (-np.log(0.6) - np.log(0.8)) / 2
    np.testing.assert_allclose(per_task["a"].mean, want, rtol=1e-6)
    assert float(counts["loss_n/a"]) == 2 and float(counts["n"]) == 3
    np.testing.assert_allclose(counts["loss_sum/a"], 2 * want, rtol=1e-6)
    np.testing.assert_allclose(counts["loss_all_sum/a"], 2 * want - np.log(0.5), rtol=1e-6)


def test_apply_update_is_optax_or_a_counted_skip():
  tx = optax.sgd(0.5)
  params = {"w": jnp.array([1.0, -2.0])}
  st = state_lib.TrainState(params=params, buffers={}, opt_state=tx.init(params),
                            gradnorm={"weights": jnp.ones(1)}, step=jnp.int32(3),
                            rng=jax.random.PRNGKey(0), nonfinite_streak=jnp.int32(2),
                            nonfinite_skips=jnp.int32(5))
  grads = {"w": jnp.array([3.0, 4.0])}
  new, norm = train_step.apply_update(tx, st, grads, jnp.float32(1.0), {"weights": jnp.full(1, 2.0)})
  np.testing.assert_allclose(new.params["w"], [1.0 - 1.5, -2.0 - 2.0])
  assert float(norm) == 5.0 and int(new.step) == 4
  assert int(new.nonfinite_streak) == 0 and int(new.nonfinite_skips) == 5
  assert float(new.gradnorm["weights"][0]) == 2.0
  bad, _ = train_step.apply_update(tx, st, grads, jnp.float32(np.nan), {"weights": jnp.full(1, 2.0)})
  np.testing.assert_array_equal(bad.params["w"], params["w"])
  assert float(bad.gradnorm["weights"][0]) == 1.0 and int(bad.step) == 4
  assert int(bad.nonfinite_streak) == 3 and int(bad.nonfinite_skips) == 6
