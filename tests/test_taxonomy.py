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
