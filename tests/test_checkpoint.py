import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import checkpoint


def _iter():
  return iter(grain.MapDataset.range(100).map(lambda i: i * 2).batch(4).to_iter_dataset())


def test_roundtrip_with_iterator_and_retention(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last_n=2)
  it = _iter()
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
  for step in (1, 2, 3):
    next(it)
    state = {"w": state["w"] + 1, "step": jnp.int32(step)}
    ckpt.save(step, state, it, {"step": step})
  expected_next = next(it)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]  # keep_last_n = 2
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last_n=2)
  assert ckpt.latest_step() == 3
  fresh = _iter()
  restored, progress = ckpt.restore(3, jax.eval_shape(lambda: state), fresh)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert int(restored["step"]) == 3 and progress == {"step": 3}
  np.testing.assert_array_equal(next(fresh), expected_next)
  ckpt.close()


def test_incomplete_checkpoint_is_ignored(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(5, {"w": jnp.ones(2)}, None, {"step": 5})
  ckpt.close()
  os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-123")  # a save killed half-way
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 5
  ckpt.close()


def test_progress_alone_is_readable(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {"w": jnp.ones(2)}, _iter(), {"step": 3, "process_count": 2})
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.progress(3) == {"step": 3, "process_count": 2}
  ckpt.close()
