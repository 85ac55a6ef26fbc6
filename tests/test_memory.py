"""Train-step memory from XLA's analysis of the compiled step, the search for the largest batch
that fits, and `data.batch_size='auto'` in a training run."""

import json

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from linnaeus_jax import config as config_lib
from linnaeus_jax import memory, sharding, train
from linnaeus_jax import resolve as resolve_lib
from linnaeus_jax import state as state_lib
from linnaeus_jax.data import pipeline


def test_check_memory_refuses_what_cannot_fit_before_allocating():
  """XLA's memory analysis of an executable whose 2^17 x 2^17 float32 output (64 GiB) no device
  here has; a small one passes and reports its bytes."""
  big = jax.jit(lambda x: x @ x.T).lower(jax.ShapeDtypeStruct((2**17, 8), jnp.float32)).compile()
  with pytest.raises(ValueError, match=r"the train step needs 64\.\d\d GiB per device .* has "):
    memory.check_memory(big)
  small = jax.jit(lambda x: x @ x.T).lower(jax.ShapeDtypeStruct((64, 8), jnp.float32)).compile()
  assert 64 * 64 * 4 <= memory.check_memory(small) < 2**20


def _brute_force(need, m, budget, top=4096):
  return max(b for b in range(m, top + 1, m) if need(b) <= budget)


@pytest.mark.parametrize("kind,need", [
    ("affine", lambda b: 5_000 + 300 * b),  # the line's prediction is exact
    ("jump", lambda b: 5_000 + 300 * b + (4_000 if b > 40 else 0)),  # bracketed, interpolated
    ("convex", lambda b: 5_000 + 300 * b + 2 * b * b),  # the line underestimates
])
@pytest.mark.parametrize("m", [2, 8])
def test_search_finds_the_largest_fitting_multiple_in_few_calls(kind, need, m):
  for budget in (20_000, 31_234, 100_000):
    calls = []
    r = memory.search(lambda b: calls.append(b) or need(b), m, budget)
    assert r["batch"] % m == 0 and need(r["batch"]) <= budget and r["bytes"] == need(r["batch"])
    assert len(set(calls)) <= 6
    best = _brute_force(need, m, budget)
    if kind == "convex":  # four interpolations get close
      assert best - 2 * m <= r["batch"] <= best
    else:
      assert r["batch"] == best
  assert r["bytes_per_sample"] == (need(4 * m) - need(m)) // (3 * m)


def test_search_limits():
  assert memory.search(lambda b: b, 2, 10**9, max_batch=100)["batch"] == 100
  with pytest.raises(ValueError, match=r"even batch 4 needs .* over the"):
    memory.search(lambda b: 1000 * b, 4, 3000)


def test_batches_split_into_pairs_of_every_micro_batch_on_every_device():
  c = tiny_config("/unused")
  assert memory.batch_multiple(c, 1) == 2 and memory.batch_multiple(c, 4) == 8
  c.train.accumulation_steps = 3
  assert memory.batch_multiple(c, 4) == 24


def test_a_resumed_run_keeps_its_recorded_batch(tmp_path):
  """The data position of a checkpoint depends on the batch: no new choice on resume."""
  c = tiny_config("/unused")
  c.data.batch_size = 24
  (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
  c.data.batch_size = "auto"
  earlier = config_lib.read_json(str(tmp_path / "config.json"))
  resolved, notes = resolve_lib._batch(c, None, None, earlier)  # pylint: disable=protected-access
  assert resolved.data.batch_size == 24 and c.data.batch_size == "auto"
  assert notes == ["data.batch_size=auto -> 24, the batch of the run being resumed"]
  with pytest.raises(ValueError, match="trained with data.batch_size=24, this run has 32"):
    bigger = config_lib.with_changes(c, {"data.batch_size": 32})
    resolve_lib._batch(bigger, None, None, earlier)  # pylint: disable=protected-access


@pytest.mark.slow
def test_auto_batch_trains_with_the_largest_batch_that_fits(small_dataset, tmp_path,
                                                            monkeypatch, capsys):
  """A device whose memory (after 50% headroom) is exactly the train step's need at batch 8
  trains at batch 8 (the search's line through batches 2 and 8 predicts no larger multiple),
  and the run records it."""
  c = tiny_config(small_dataset[0], steps=1)
  config, data = resolve_lib.resolve(c)
  mesh = sharding.make_mesh(config)
  n8 = memory.step_bytes(memory.compile_train_step(
      config, 8, mesh, state_lib.loss_constants(config, data),
      pipeline.padding_record(data, config), data.taxonomy.parents)[0])
  monkeypatch.setattr(memory, "device_memory", lambda device: (n8 * 2, "test"))
  c.data.batch_size, c.data.batch_size_headroom = "auto", 0.5
  train.run(c, str(tmp_path))
  out = capsys.readouterr().out
  resolved = json.load(open(tmp_path / "config.json"))
  assert resolved["data"]["batch_size"] == 8
  note = [n for n in resolved["misc"]["auto_choices"] if n.startswith("data.batch_size")]
  assert note and note[0].startswith(f"data.batch_size=auto -> 8: {n8 / 2**30:,.2f} GiB"), note
  assert "2 compilations" in note[0], note
  assert "auto: data.batch_size=auto -> 8" in out and "batch 8 on 1 device(s)" in out
