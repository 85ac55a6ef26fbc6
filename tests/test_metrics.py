import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linnaeus_jax import losses, metrics
from linnaeus_jax.taxonomy import TaxonomyTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loss(*v):
  """Every example included with weight 1: the loss counts are plain sums of `v`."""
  v = jnp.array(v, jnp.float32)
  return losses.TaskLoss(None, v, jnp.ones(v.shape, bool), jnp.ones_like(v))


def _onehot_logits(preds, c):
  return 5.0 * jax.nn.one_hot(jnp.array(preds), c)


def _ordered_logits(orders, c):
  """Row b scores orders[b][0] > orders[b][1] > ... > every other class."""
  z = np.zeros((len(orders), c), np.float32)
  for b, order in enumerate(orders):
    for j, cls in enumerate(order):
      z[b, cls] = 10.0 - j
  return jnp.asarray(z)


def test_counts_by_hand():
  logits = {"a": jnp.array([[3.0, 0.0], [0.0, 1.0], [5.0, 0.0]]),
            "b": jnp.array([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])}
  labels = {"a": jnp.array([0, 0, 0]), "b": jnp.array([1, 1, 1])}
  per_task = {"a": _loss(1.0, 2.0, 100.0), "b": _loss(3.0, 4.0, 100.0)}
  mask = jnp.array([True, True, False])  # the third example is padding
  c = metrics.batch_counts(logits, labels, per_task, mask, ["a", "b"])
  total = metrics.accumulate(metrics.accumulate(None, c), c)
  out = metrics.finalize(total, ["a", "b"])
  assert out["num_examples"] == 4
  np.testing.assert_allclose(out["acc1/a"], 50.0)
  np.testing.assert_allclose(out["acc1/b"], 100.0)
  np.testing.assert_allclose(out["chain_accuracy"], 50.0)
  np.testing.assert_allclose(out["loss/a"], 1.5)
  np.testing.assert_allclose(out["loss"], 1.5 + 3.5)
  # Without partial levels there are no nulls: partial chain accuracy is chain accuracy.
  np.testing.assert_allclose(out["partial_chain_accuracy"], 50.0)
  assert not any("null" in k for k in out)


def test_loss_counts_follow_the_include_mask_weights_and_task_weights():
  """loss/t = sum w_b l_b / (included), as the train loss; loss = sum_t w_t loss/t; loss_all
  counts every real example unweighted."""
  logits = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((4, 2))}
  labels = {"a": jnp.array([0, 1, 1, 0]), "b": jnp.array([1, 1, 0, 0])}
  l = jnp.array([1.0, 2.0, 4.0, 100.0])
  per_task = {
      "a": losses.TaskLoss(None, l, jnp.array([False, True, True, True]),
                           jnp.array([0.0, 3.0, 0.5, 1.0])),  # row 0 a masked null
      "b": losses.TaskLoss(None, l, jnp.ones(4, bool), jnp.ones(4))}
  mask = jnp.array([True, True, True, False])  # row 3 padding
  c = metrics.batch_counts(logits, labels, per_task, mask, ["a", "b"], null_class=True)
  out = metrics.finalize(metrics.accumulate(None, c), ["a", "b"], task_weights=[2.0, 0.5])
  np.testing.assert_allclose(out["loss/a"], (3.0 * 2.0 + 0.5 * 4.0) / 2)
  np.testing.assert_allclose(out["loss/b"], (1.0 + 2.0 + 4.0) / 3)
  np.testing.assert_allclose(out["loss"], 2.0 * 4.0 + 0.5 * 7.0 / 3, rtol=1e-6)
  np.testing.assert_allclose(out["loss_all/a"], 7.0 / 3)
  np.testing.assert_allclose(out["loss_all"], 14.0 / 3, rtol=1e-6)
  np.testing.assert_allclose(out["loss_null/a"], 1.0)  # the masked null, still reported


def test_topk_by_hand():
  # Task a: 4 classes; task b: 2 classes, so its top-3 is its top-1. Row 3 is padding.
  logits = {"a": jnp.array([[0.1, 0.5, 0.3, 0.9],    # y=1: top1 3 (wrong), top3 {3,1,2} hit
                            [2.0, 1.0, 0.0, 3.0],    # y=2: top1 3 (wrong), top3 {3,0,1} miss
                            [0.0, 0.0, 5.0, 1.0],    # y=2: top1 hit
                            [9.0, 0.0, 0.0, 0.0]]),  # padding (would be a hit)
            "b": jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])}
  labels = {"a": jnp.array([1, 2, 2, 0]), "b": jnp.array([1, 1, 0, 1])}
  per_task = {"a": _loss(0, 0, 0, 0), "b": _loss(0, 0, 0, 0)}
  mask = jnp.array([True, True, True, False])
  c = metrics.batch_counts(logits, labels, per_task, mask, ["a", "b"], topk=(1, 3, 5))
  assert float(c["n"]) == 3
  assert float(c["correct1/a"]) == 1 and float(c["correct3/a"]) == 2
  assert float(c["correct5/a"]) == 1  # 4 classes < 5: top-5 is top-1
  assert float(c["correct1/b"]) == 1 and float(c["correct3/b"]) == 1
  out = metrics.finalize(metrics.accumulate(None, c), ["a", "b"])
  np.testing.assert_allclose([out["acc1/a"], out["acc3/a"], out["acc5/a"]],
                             [100 / 3, 200 / 3, 100 / 3])
  np.testing.assert_allclose([out["acc1/b"], out["acc3/b"]], [100 / 3, 100 / 3])


# Species / genus / family labels and top-1 predictions; row 5 is padding.
CHAIN_LABELS = {"s": [0, 0, 1, 2, 0, 1], "g": [2, 0, 1, 1, 0, 1], "f": [1, 0, 1, 1, 1, 1]}
CHAIN_PREDS = {"s": [1, 0, 1, 2, 0, 2], "g": [2, 0, 1, 2, 0, 2], "f": [1, 0, 1, 1, 1, 0]}
CHAIN_C = {"s": 3, "g": 3, "f": 2}


def _chain_batch():
  tasks = ["s", "g", "f"]
  logits = {t: _onehot_logits(CHAIN_PREDS[t], CHAIN_C[t]) for t in tasks}
  labels = {t: jnp.array(CHAIN_LABELS[t]) for t in tasks}
  per_task = {t: _loss(1, 2, 3, 4, 5, 100) for t in tasks}
  mask = jnp.array([True] * 5 + [False])
  return tasks, logits, labels, per_task, mask


def test_partial_chain_accuracy_with_null_ranks():
  tasks, logits, labels, per_task, mask = _chain_batch()
  c = metrics.batch_counts(logits, labels, per_task, mask, tasks, null_class=True)
  # 0: null species mispredicted, genus and family right -> partial right, chain wrong.
  # 1: all null -> excluded from partial, chain right. 2: all right. 3: genus wrong.
  # 4: null species and genus predicted null, family right -> both right.
  assert float(c["chain_correct"]) == 3           # samples 1, 2, 4
  assert float(c["partial_chain_n"]) == 4         # samples 0, 2, 3, 4
  assert float(c["partial_chain_correct"]) == 3   # samples 0, 2, 4
  out = metrics.finalize(metrics.accumulate(None, c), tasks)
  np.testing.assert_allclose(out["chain_accuracy"], 60.0)
  np.testing.assert_allclose(out["partial_chain_accuracy"], 75.0)
  # Without partial levels label 0 is a class like any other.
  c = metrics.batch_counts(logits, labels, per_task, mask, tasks)
  out = metrics.finalize(metrics.accumulate(None, c), tasks)
  np.testing.assert_allclose(out["partial_chain_accuracy"], 60.0)


def test_null_and_non_null_accuracy():
  tasks, logits, labels, per_task, mask = _chain_batch()
  c = metrics.batch_counts(logits, labels, per_task, mask, tasks, null_class=True)
  # species: null samples 0, 1, 4 (right: 1, 4), non-null 2, 3 (both right).
  assert (float(c["null_n/s"]), float(c["null_correct1/s"])) == (3, 2)
  assert (float(c["non_null_n/s"]), float(c["non_null_correct1/s"])) == (2, 2)
  out = metrics.finalize(metrics.accumulate(None, c), tasks)
  np.testing.assert_allclose([out["acc1_null/s"], out["acc1_non_null/s"]], [200 / 3, 100.0])
  np.testing.assert_allclose([out["loss_null/s"], out["loss_non_null/s"]],
                             [(1 + 2 + 5) / 3, (3 + 4) / 2])
  # genus: null 1, 4 (both right), non-null 0, 2, 3 (sample 3 wrong).
  np.testing.assert_allclose([out["acc1_null/g"], out["acc1_non_null/g"]], [100.0, 200 / 3])
  # family: one null sample (right), four non-null (all right).
  np.testing.assert_allclose([out["acc1_null/f"], out["acc1_non_null/f"]], [100.0, 100.0])
  np.testing.assert_allclose(out["acc1/s"], 80.0)


def _tree(species_parents, genus_parents=(-1, 1, 1, 2)):
  """Species -> genus -> family; class 0 of each rank is the null class."""
  return TaxonomyTree(["L10", "L20", "L30"], {"L10": len(species_parents), "L20": 4, "L30": 3},
                      {"L10": np.array(species_parents, np.int32),
                       "L20": np.array(genus_parents, np.int32)})


# Genera 1, 2 in family 1, genus 3 in family 2; species 1, 2 in genus 1, 3 in genus 2,
# 4 in genus 3, species 5 has no known parent.
TREE_SPECIES = (-1, 1, 1, 2, 3, -1)
TREE_LCA = np.array([[0, 3, 3, 3, 3, 3],
                     [3, 0, 1, 2, 3, 3],
                     [3, 1, 0, 2, 3, 3],
                     [3, 2, 2, 0, 3, 3],
                     [3, 3, 3, 3, 0, 3],
                     [3, 3, 3, 3, 3, 0]])


def test_lca_heights_by_hand():
  h = metrics.lca_heights(_tree(TREE_SPECIES), "L10", null_class=True)
  assert h.dtype == np.int8
  np.testing.assert_array_equal(h, TREE_LCA)
  np.testing.assert_array_equal(metrics.lca_heights(_tree(TREE_SPECIES), "L10", True, block=2),
                                TREE_LCA)
  # Genus rank: two ranks up to the top, so "no common ancestor" is 2.
  np.testing.assert_array_equal(metrics.lca_heights(_tree(TREE_SPECIES), "L20", True),
                                [[0, 2, 2, 2], [2, 0, 1, 2], [2, 1, 0, 2], [2, 2, 2, 0]])


def test_lca_heights_null_class_links():
  # Species 0 and 6 are linked to the null genus 0, itself linked to the null family 0.
  tree = _tree((0, 1, 1, 2, 3, -1, 0), genus_parents=(0, 1, 1, 2))
  with_null = metrics.lca_heights(tree, "L10", null_class=True)
  assert with_null[0, 6] == 3 and with_null[6, 6] == 0 and with_null[6, 1] == 3
  np.testing.assert_array_equal(with_null[:6, :6], TREE_LCA)
  # Without the null class, 0 is an ordinary class: species 0 and 6 share genus 0.
  plain = metrics.lca_heights(tree, "L10", null_class=False)
  assert plain[0, 6] == 1 and plain[0, 1] == 3 and plain[6, 3] == 3


def _severity_batch():
  tasks = ["L10", "L20", "L30"]
  # Finest-rank labels and score orders (first = top-1). Row 3 has a null label, row 4 is padding.
  y = [1, 3, 4, 0, 1]
  orders = [[2, 3, 1], [3, 1, 4], [0, 4, 5], [1, 2, 3], [4, 5, 0]]
  logits = {"L10": _ordered_logits(orders, 6), "L20": _onehot_logits([1] * 5, 4),
            "L30": _onehot_logits([1] * 5, 3)}
  labels = {"L10": jnp.array(y), "L20": jnp.array([1, 2, 3, 0, 1]),
            "L30": jnp.array([1, 1, 2, 0, 1])}
  per_task = {t: _loss(0, 0, 0, 0, 0) for t in tasks}
  mask = jnp.array([True, True, True, True, False])
  return tasks, logits, labels, per_task, mask


def test_mistake_severity_and_hierarchical_distance_by_hand():
  tasks, logits, labels, per_task, mask = _severity_batch()
  lca = jnp.asarray(metrics.lca_heights(_tree(TREE_SPECIES), "L10", null_class=True))
  c = metrics.batch_counts(logits, labels, per_task, mask, tasks, null_class=True,
                           lca_CxC=lca)
  # Row 0: y=1, top-1 2 (same genus, height 1), top-3 heights (1, 2, 0).
  # Row 1: y=3, correct; top-3 heights (0, 2, 3).
  # Row 2: y=4, top-1 the null class (height 3); top-3 heights (3, 0, 3).
  # Row 3 (null label) and row 4 (padding) count nowhere.
  assert float(c["hdist_n/L10"]) == 3
  assert float(c["mistake_n/L10"]) == 2
  assert float(c["mistake_height_sum/L10"]) == 4
  np.testing.assert_allclose(float(c["hdist1_sum/L10"]), 1 + 0 + 3)
  np.testing.assert_allclose(float(c["hdist3_sum/L10"]), 1 + 5 / 3 + 2, rtol=1e-6)
  out = metrics.finalize(metrics.accumulate(None, c), tasks)
  np.testing.assert_allclose(out["mistake_severity/L10"], 2.0)
  np.testing.assert_allclose(out["hier_dist1/L10"], 4 / 3, rtol=1e-6)
  np.testing.assert_allclose(out["hier_dist3/L10"], 14 / 9, rtol=1e-6)
  # Skipped without the matrix.
  c = metrics.batch_counts(logits, labels, per_task, mask, tasks, null_class=True)
  out = metrics.finalize(metrics.accumulate(None, c), tasks)
  assert not any(k.startswith(("mistake", "hier_dist")) for k in out)


def test_finalize_with_empty_denominators_reports_zero():
  tasks, logits, labels, per_task, mask = _severity_batch()
  lca = metrics.lca_heights(_tree(TREE_SPECIES), "L10", null_class=True)
  only_null = jnp.array([False, False, False, True, False])  # one real sample, null label
  c = metrics.batch_counts(logits, labels, per_task, only_null, tasks, null_class=True,
                           lca_CxC=lca)
  out = metrics.finalize(metrics.accumulate(None, c), tasks)
  assert out["num_examples"] == 1
  assert out["mistake_severity/L10"] == 0.0 and out["hier_dist3/L10"] == 0.0
  assert out["acc1_non_null/L10"] == 0.0 and out["partial_chain_accuracy"] == 0.0
  np.testing.assert_allclose(out["acc1_null/L10"], 0.0)  # top-1 is class 1, label null


def _random_batch(b, seed):
  rng = np.random.default_rng(seed)
  tasks, sizes = ["L10", "L20", "L30"], {"L10": 6, "L20": 4, "L30": 3}
  logits = {t: jnp.asarray(rng.normal(size=(b, sizes[t])), jnp.float32) for t in tasks}
  labels = {t: jnp.asarray(rng.integers(0, sizes[t], b)) for t in tasks}
  per_task = {t: _loss(*rng.uniform(size=b)) for t in tasks}
  mask = jnp.asarray(rng.uniform(size=b) < 0.8)
  return tasks, logits, labels, per_task, mask


def test_counts_of_two_halves_sum_to_the_full_batch_under_jit():
  tasks, logits, labels, per_task, mask = _random_batch(16, 0)
  lca = jnp.asarray(metrics.lca_heights(_tree(TREE_SPECIES), "L10", null_class=True))
  step = jax.jit(functools.partial(metrics.batch_counts, task_keys=tasks, topk=(1, 3),
                                   null_class=True))

  def part(sl):
    take = lambda d: {t: v[sl] for t, v in d.items()}
    pt = {t: jax.tree.map(lambda x: x[sl], per_task[t]._replace(mean=None)) for t in tasks}
    return step(take(logits), take(labels), pt, mask[sl], lca_CxC=lca)
  full = metrics.accumulate(None, part(slice(0, 16)))
  halves = metrics.accumulate(metrics.accumulate(None, part(slice(0, 8))), part(slice(8, 16)))
  assert full.keys() == halves.keys()
  for k in full:
    np.testing.assert_allclose(halves[k], full[k], rtol=1e-5, err_msg=k)
  assert full["n"] == float(np.sum(np.asarray(mask)))
  assert metrics.finalize(halves, tasks).keys() == metrics.finalize(full, tasks).keys()


def test_accumulate_rejects_different_keys():
  c = {"n": 1.0, "correct1/a": 1.0}
  with pytest.raises(ValueError, match="keys differ"):
    metrics.accumulate(metrics.accumulate(None, c), {"n": 1.0})


@pytest.mark.slow
def test_counts_on_8_host_devices_equal_single_device():
  """The batch sharded over 8 CPU devices gives the same counts (XLA sums across devices)."""
  script = textwrap.dedent("""
      import json, sys
      import jax, jax.numpy as jnp, numpy as np
      sys.path.insert(0, "tests")
      from test_metrics import _random_batch, _tree, TREE_SPECIES
      from linnaeus_jax import metrics
      assert jax.device_count() == 8
      tasks, logits, labels, per_task, mask = _random_batch(32, 1)
      lca = jnp.asarray(metrics.lca_heights(_tree(TREE_SPECIES), "L10", null_class=True))
      mesh = jax.make_mesh((8,), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))  # as in sharding.py
      sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      put = lambda x: jax.device_put(x, sh)
      f = jax.jit(lambda lg, lb, pt, m, lca: metrics.batch_counts(
          lg, lb, pt, m, tasks, null_class=True, lca_CxC=lca))
      sharded = f(jax.tree.map(put, logits), jax.tree.map(put, labels),
                  {t: jax.tree.map(put, per_task[t]) for t in tasks}, put(mask), lca)
      single = metrics.batch_counts(logits, labels, per_task, mask, tasks, null_class=True,
                                    lca_CxC=lca)
      print(json.dumps([metrics.accumulate(None, sharded), metrics.accumulate(None, single)]))
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  sharded, single = json.loads(res.stdout.strip().splitlines()[-1])
  assert sharded.keys() == single.keys()
  for k in single:
    np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, err_msg=k)


def test_subset_accuracy_and_rarity_bins_by_hand():
  bins = metrics.rarity_bins(np.array([7, 1, 2, 10, 0]), [50], null_class=True)
  # Present non-null counts [1, 2, 10]: median 2; side 'right': count 2 -> bin 1.
  np.testing.assert_array_equal(bins, [1, 0, 1, 1, 0])
  tasks = ["fine", "coarse"]
  labels = {"fine": jnp.array([1, 2, 3, 3]), "coarse": jnp.array([1, 1, 2, 2])}
  logits = {"fine": jax.nn.one_hot(jnp.array([1, 0, 3, 2]), 5),
            "coarse": jax.nn.one_hot(jnp.array([1, 2, 2, 2]), 3)}
  mask = jnp.array([True, True, True, False])
  members = metrics.subset_membership(labels, tasks, ["c2", "f3"], jnp.array([1, 0]),
                                      jnp.array([2, 3]), jnp.asarray(bins), 2)
  np.testing.assert_array_equal(members["c2"], [False, False, True, True])
  np.testing.assert_array_equal(members["rarity_0"], [True, False, False, False])  # class 1
  counts = metrics.subset_counts(logits, labels, mask, tasks, members)
  assert float(counts["subset_n/c2"]) == 1  # the padded row does not count
  assert float(counts["subset_correct1/c2/fine"]) == 1
  assert float(counts["subset_n/rarity_1"]) == 2  # rows 1 and 2 (row 3 is padding)
  assert float(counts["subset_correct1/rarity_1/coarse"]) == 1
  base = metrics.batch_counts(logits, labels, {t: _loss(0, 0, 0, 0) for t in tasks}, mask,
                              tasks)
  out = metrics.finalize({k: float(v) for k, v in {**base, **counts}.items()}, tasks)
  assert out["subset_acc1/rarity_1/fine"] == pytest.approx(50.0)
  assert out["subset_acc1/rarity_0/fine"] == pytest.approx(100.0)
  assert out["subset_acc1/f3/fine"] == pytest.approx(100.0)  # row 2 right, row 3 padding


def test_per_class_counts_and_rates_by_hand():
  """labels 0 1 1 2 (2 masked), predictions 0 2 1 2 (0): per class support 1 2 1, correct
  1 1 1, predicted 1 1 2 -> top-1 100 50 100, precision 100 100 50."""
  labels = jnp.array([0, 1, 1, 2, 2])
  logits = jax.nn.one_hot(jnp.array([0, 2, 1, 2, 0]), 3)
  mask = jnp.array([True, True, True, True, False])
  counts = np.asarray(metrics.class_counts(labels, logits, mask))
  np.testing.assert_array_equal(counts, [[1, 2, 1], [1, 1, 1], [1, 1, 2]])
  rows = metrics.per_class(counts * 2, [0, 101, 102], [5, 7, 0])  # two such batches
  assert [(r["support"], r["correct"], r["predicted"]) for r in rows] == [(2, 2, 2), (4, 2, 2),
                                                                         (2, 2, 4)]
  assert [(r["top1"], r["precision"]) for r in rows] == [(100.0, 100.0), (50.0, 100.0),
                                                        (100.0, 50.0)]
  assert [r["taxon_id"] for r in rows] == [0, 101, 102] and rows[1]["train_count"] == 7
  assert [r["class"] for r in metrics.worst(rows, 2)] == [1, 0]
  unseen = metrics.per_class(np.zeros((3, 2)), [0, 1], [3, 0])
  assert unseen[0]["top1"] is None and metrics.worst(unseen) == []
