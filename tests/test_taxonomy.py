import math

import numpy as np
import pytest

from linnaeus_jax import taxonomy

TASKS = ["taxa_L10", "taxa_L20", "taxa_L30"]
NUM = {"taxa_L10": 5, "taxa_L20": 3, "taxa_L30": 2}
# species 1,2 -> genus 1 -> family 1; species 3,4 -> genus 2 -> family 1; class 0 = null
LABELS = np.array([[1, 1, 1], [2, 1, 1], [3, 2, 1], [4, 2, 1], [0, 2, 1], [0, 0, 1]])


def test_links_matrices_and_json_roundtrip():
  tree = taxonomy.TaxonomyTree.from_labels(LABELS, TASKS, NUM, null_class=True)
  np.testing.assert_array_equal(tree.parents["taxa_L10"], [-1, 1, 1, 2, 2])
  np.testing.assert_array_equal(tree.parents["taxa_L20"], [-1, 1, 1])
  h = tree.matrix("taxa_L10")
  assert h.shape == (3, 5)
  np.testing.assert_array_equal(h, [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])
  again = taxonomy.TaxonomyTree.from_json(tree.to_json())
  for t in tree.parents:
    np.testing.assert_array_equal(again.parents[t], tree.parents[t])
  assert tree.hierarchy_map()["taxa_L10"] == {1: 1, 2: 1, 3: 2, 4: 2}


def test_multi_parent():
  bad = np.concatenate([LABELS, [[1, 2, 1], [1, 2, 1]]])
  with pytest.raises(taxonomy.TaxonomyError, match=r"taxon 1 \(taxa_L10\) has several parents in taxa_L20: \[1, 2\]"):
    taxonomy.TaxonomyTree.from_labels(bad, TASKS, NUM, null_class=True)
  tree = taxonomy.TaxonomyTree.from_labels(bad, TASKS, NUM, null_class=True, resolve="majority")
  assert tree.parents["taxa_L10"][1] == 2  # seen twice with genus 2, once with genus 1


def test_json_out_of_range_link():
  with pytest.raises(taxonomy.TaxonomyError, match="out of range"):
    taxonomy.TaxonomyTree.from_json('{"task_keys": ["a", "b"], "num_classes": {"a": 2, "b": 2},'
                                    ' "hierarchy_map_raw": {"a": {"1": 5}}}')


# ----------------------------------------------------------------------------- Smoothing matrices

# Class 0 = null at every rank. Species 1,2 -> genus 1; species 3 -> genus 2; species 4,5 ->
# genus 3. Genera 1,2 -> family 1; genus 3 -> family 2.
SMOOTH_TREE = taxonomy.TaxonomyTree(
    TASKS, {"taxa_L10": 6, "taxa_L20": 4, "taxa_L30": 3},
    {"taxa_L10": np.array([-1, 1, 1, 2, 3, 3], np.int32),
     "taxa_L20": np.array([-1, 1, 1, 2], np.int32)})
ALPHA, BETA = 0.2, 0.7


def _smooth(enabled=(True, True, True), **kw):
  args = dict(alpha=ALPHA, beta=BETA, uniform_roots=True, fallback_to_uniform=True,
              null_class=True)
  args.update(kw)
  return taxonomy.smoothing_matrices(SMOOTH_TREE, list(enabled), **args)


def test_smoothing_matrix_hand_values():
  t = _smooth()
  assert set(t) == set(TASKS) and t["taxa_L10"].dtype == np.float32
  s = t["taxa_L10"]
  e2, e4 = math.exp(-2 * BETA), math.exp(-4 * BETA)
  # Species 1: sibling 2 (d = 2), cousin 3 (d = 4); species 4, 5 and the null are disconnected.
  np.testing.assert_allclose(s[1], [0, 1 - ALPHA, ALPHA * e2 / (e2 + e4), ALPHA * e4 / (e2 + e4),
                                    0, 0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s[3], [0, ALPHA / 2, ALPHA / 2, 1 - ALPHA, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(s[4], [0, 0, 0, 0, 1 - ALPHA, ALPHA], rtol=1e-6)
  # The null has no parent: a uniform row.
  np.testing.assert_allclose(s[0], [1 - ALPHA] + [ALPHA / 5] * 5, rtol=1e-6)
  assert s[1, 2] > s[1, 3] > s[1, 4] == 0  # siblings > cousins > other families
  g = t["taxa_L20"]
  np.testing.assert_allclose(g[1], [0, 1 - ALPHA, ALPHA, 0], rtol=1e-6)
  np.testing.assert_allclose(g[3], [ALPHA / 3, ALPHA / 3, ALPHA / 3, 1 - ALPHA], rtol=1e-6)
  # The top rank has no parents: uniform with the fallback.
  np.testing.assert_allclose(t["taxa_L30"], np.full((3, 3), ALPHA / 2) + np.eye(3) *
                             (1 - ALPHA - ALPHA / 2), rtol=1e-6)
  for m in t.values():
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)


def test_smoothing_enabled_roots_and_fallback():
  assert set(_smooth(enabled=[False, True])) == {"taxa_L20"}  # missing flags count as False
  with pytest.raises(ValueError, match="taxa_L30"):
    _smooth(enabled=[False, False, True], fallback_to_uniform=False)
  # A rank whose links are all unknown is no better than the top rank.
  cut = taxonomy.TaxonomyTree(SMOOTH_TREE.task_keys, SMOOTH_TREE.num_classes,
                              {"taxa_L10": np.full(6, -1, np.int32),
                               "taxa_L20": SMOOTH_TREE.parents["taxa_L20"]})
  with pytest.raises(ValueError, match="taxa_L10"):
    taxonomy.smoothing_matrices(cut, [True], ALPHA, BETA, True, False, True)
  uni = taxonomy.smoothing_matrices(cut, [True], ALPHA, BETA, True, True, True)["taxa_L10"]
  np.testing.assert_allclose(uni, np.full((6, 6), ALPHA / 5) + np.eye(6) * (1 - ALPHA - ALPHA / 5),
                             rtol=1e-6)
  # Parentless classes are uniform rows with or without uniform_roots (they have no relatives).
  for roots in (True, False):
    s = _smooth(uniform_roots=roots)["taxa_L10"]
    np.testing.assert_allclose(s[0], [1 - ALPHA] + [ALPHA / 5] * 5, rtol=1e-6)
  # null_class=False changes nothing for a tree whose class 0 has no links.
  s = _smooth(null_class=False)["taxa_L20"]
  np.testing.assert_allclose(s[1], [0, 1 - ALPHA, ALPHA, 0], rtol=1e-6)
  # A very large beta underflows every weight: uniform rows (weight sum < 1e-9).
  s = _smooth(beta=50.0)["taxa_L10"]
  np.testing.assert_allclose(s[1], [ALPHA / 5, 1 - ALPHA] + [ALPHA / 5] * 4, rtol=1e-6)


def test_null_class_is_nobodys_relative():
  # Species 1, 2 linked to genus 0: with null_class, genus 0 is the null, so they are not siblings.
  tree = taxonomy.TaxonomyTree(["a", "b"], {"a": 3, "b": 2},
                               {"a": np.array([-1, 0, 0], np.int32)})
  with pytest.raises(ValueError, match="'a'"):
    taxonomy.smoothing_matrices(tree, [True], ALPHA, BETA, True, False, True)
  s = taxonomy.smoothing_matrices(tree, [True], ALPHA, BETA, True, False, False)["a"]
  np.testing.assert_allclose(s[1], [0, 1 - ALPHA, ALPHA], rtol=1e-6)


def _brute_row(tree, task, i, alpha, beta):
  """Per-pair LCA distances by walking parent chains, then the taxonomy-smoothing row of
  docs/training.md#losses (no null class)."""
  ks = tree.task_keys[tree.task_keys.index(task):-1]

  def chain(c):
    out = []
    for t in ks:
      c = int(tree.parents[t][c]) if c >= 0 else -1
      out.append(c)
    return out

  n = tree.num_classes[task]
  ci = chain(i)
  w = np.zeros(n)
  for j in range(n):
    if j == i:
      continue
    cj = chain(j)
    d = next((2 * (k + 1) for k in range(len(ks)) if ci[k] >= 0 and ci[k] == cj[k]), math.inf)
    w[j] = 0.0 if d == math.inf else math.exp(-beta * d)
  if w.sum() < 1e-9 or ci[0] < 0:
    row = np.full(n, alpha / (n - 1))
  else:
    row = alpha * w / w.sum()
  row[i] = 1 - alpha
  return row / row.sum()


def test_smoothing_matrix_large_random_tree_vs_brute_force():
  rng = np.random.default_rng(0)
  tasks = ["s", "g", "f", "o"]
  num = {"s": 2000, "g": 150, "f": 12, "o": 3}
  parents = {}
  for child, parent in zip(tasks, tasks[1:]):
    par = rng.integers(0, num[parent], num[child]).astype(np.int32)
    par[rng.random(num[child]) < 0.05] = -1  # some unknown links
    parents[child] = par
  tree = taxonomy.TaxonomyTree(tasks, num, parents)
  t = taxonomy.smoothing_matrices(tree, [True, True, False, False], 0.1, 1.0, True, True, False,
                                  block=300)
  s = t["s"]
  assert s.shape == (2000, 2000)
  np.testing.assert_allclose(s.sum(1), 1.0, rtol=1e-5)
  rows = np.concatenate([rng.choice(2000, 25, replace=False),
                         np.flatnonzero(parents["s"] < 0)[:3]])
  for i in rows:
    np.testing.assert_allclose(s[i], _brute_row(tree, "s", int(i), 0.1, 1.0), rtol=1e-5,
                               atol=1e-9)
  for i in rng.choice(150, 10, replace=False):
    np.testing.assert_allclose(t["g"][i], _brute_row(tree, "g", int(i), 0.1, 1.0), rtol=1e-5,
                               atol=1e-9)
