import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _state(v):
  return {"w": jnp.full((8, 8), float(v)), "step": jnp.int32(v)}


def test_provisional_checkpoints_never_rotate_good_ones_out(tmp_path):
  """keep_last_n=2: two good checkpoints stay while provisional ones come and are discarded;
  confirmed ones rotate as usual."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last_n=2, async_save=False)
  for step in (2, 4):
    ckpt.save(step, _state(step), None, {"step": step})
  for step in (6, 8):
    ckpt.save(step, _state(step), None, {"step": step}, provisional=True)
  assert ckpt.steps() == [2, 4, 6, 8]
  assert ckpt.discard() == [6, 8] and ckpt.steps() == [2, 4]
  ckpt.save(10, _state(10), None, {"step": 10}, provisional=True)
  ckpt.confirm()
  ckpt.save(12, _state(12), None, {"step": 12})
  assert ckpt.steps() == [10, 12]
  ckpt.close()


def truncate_largest_array(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
           if os.sep + "d" + os.sep in os.path.join(r, f)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def remove_metadata(step_dir):
  for name in ("_METADATA", "array_metadatas"):
    p = step_dir / "state" / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def empty_folder(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


DAMAGES = [  # (damage, what the error says)
    (truncate_largest_array, "unreadable"),
    (remove_metadata, "state metadata"),
    (empty_folder, "lacks state, progress"),
]


@pytest.mark.parametrize("damage,needle", DAMAGES, ids=[d[0].__name__ for d in DAMAGES])
def test_a_damaged_step_names_itself_and_the_previous_intact_one(tmp_path, damage, needle):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last_n=3, async_save=False)
  big = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "step": jnp.int32(0)}
  for step in (2, 4, 6):
    ckpt.save(step, big, None, {"step": step})
  ckpt.close()
  damage(tmp_path / "6")
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last_n=3, async_save=False)
  abstract = jax.eval_shape(lambda: big)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore(6, abstract, None)
  msg = str(e.value)
  assert "step 6" in msg and "damaged" in msg and needle in msg, msg
  assert "--config.train.resume_step=4" in msg and "\n" not in msg, msg
  assert ckpt.set_aside_after(2, abstract) == []  # only damaged checkpoints are set aside
  assert ckpt.steps() == [2, 4, 6]
  assert ckpt.set_aside_after(4, abstract) == [6]
  assert ckpt.steps() == [2, 4] and os.listdir(f"{tmp_path}_set_aside") == ["6"]
  restored, _ = ckpt.restore(ckpt.latest_step(), abstract, None)
  np.testing.assert_array_equal(restored["w"], big["w"])
  ckpt.close()


def test_a_state_of_another_shape_names_the_differing_leaves(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, {"params": {"a": jnp.ones((4, 3)), "b": jnp.ones(2)}}, None, {"step": 1})
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore(1, jax.eval_shape(lambda: {"params": {"a": jnp.ones((5, 3)),
                                                       "c": jnp.ones(2)}}), None)
  msg = str(e.value)
  assert "params/a: checkpoint (4, 3), this config (5, 3)" in msg, msg
  assert "params/b: in the checkpoint, not in this model" in msg, msg
  assert "params/c: missing from the checkpoint" in msg and "damaged" not in msg, msg
  ckpt.close()
