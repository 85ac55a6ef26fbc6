import ml_collections
import numpy as np
from hypothesis import given, settings, strategies as st

from linnaeus_jax.data import pipeline, sampler


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(-1, 5), min_size=1, max_size=200),
       seed=st.integers(0, 2**16), epoch=st.integers(0, 5), half_batch=st.integers(1, 8))
def test_epoch_order_guarantees(groups, seed, epoch, half_batch):
  group = np.array(groups, np.int32)
  gb = 2 * half_batch
  rows, ok = sampler.epoch_order(group, seed, epoch, gb)
  assert len(rows) % gb == 0 and len(rows) == pipeline.steps_per_epoch(group, gb) * gb
  real = rows[rows >= 0]
  assert sorted(real) == list(range(len(group)))  # every row exactly once per epoch
  assert len(rows) - len(real) < gb + 1
  a, b = rows[0::2], rows[1::2]  # partners at (2i, 2i+1)
  assert np.array_equal(ok[0::2], ok[1::2])
  pairs = ok[0::2]
  assert np.all(group[a[pairs]] == group[b[pairs]]) and np.all(group[a[pairs]] >= 0)
  # Every group with >= 2 members leaves at most one member unpaired.
  paired = np.zeros(len(group), bool)
  paired[a[pairs]] = paired[b[pairs]] = True
  for g in set(groups) - {-1}:
    assert np.sum((group == g) & ~paired) == np.sum(group == g) % 2
  assert not paired[group < 0].any()
  rows2, ok2 = sampler.epoch_order(group, seed, epoch, gb)
  assert np.array_equal(rows, rows2) and np.array_equal(ok, ok2)  # pure in (seed, epoch)


def test_epochs_differ():
  group = np.repeat(np.arange(5), 8)
  r0, _ = sampler.epoch_order(group, 0, 0, 8)
  r1, _ = sampler.epoch_order(group, 0, 1, 8)
  assert not np.array_equal(r0, r1)


def _config(min_group=3, exclude_null=False, null_keys=()):
  return ml_collections.ConfigDict({
      "schedule": {"mix": {"group_levels": ["taxa_L20"], "min_group_size": min_group,
                           "exclude_null_samples": exclude_null,
                           "null_task_keys": list(null_keys)}},
      "data": {"partial": {"levels": True}}})


def test_mix_groups_by_hand():
  labels = np.array([[1, 1], [2, 1], [0, 1], [3, 2], [4, 2], [5, 3], [0, 2], [6, 2]])
  tasks = ["taxa_L10", "taxa_L20"]
  np.testing.assert_array_equal(sampler.mix_groups(labels, tasks, _config()),
                                [1, 1, 1, 2, 2, -1, 2, 2])  # group 3 has one member < 3
  np.testing.assert_array_equal(
      sampler.mix_groups(labels, tasks, _config(exclude_null=True)),
      [1, 1, -1, 2, 2, -1, -1, 2])  # null on any task -> unmixable
  np.testing.assert_array_equal(
      sampler.mix_groups(labels, tasks, _config(exclude_null=True, null_keys=["taxa_L20"])),
      [1, 1, 1, 2, 2, -1, 2, 2])  # only taxa_L20 nulls count
