import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from linnaeus_jax.models import heads

TASKS = ("fine", "mid", "coarse")


def _config(types, routing="soft", temperature=1.0, classes=(4, 2, 2)):
  return ml_collections.ConfigDict({t: dict(type=ty, num_classes=n, routing_strategy=routing,
                                            temperature=temperature)
                                    for t, ty, n in zip(TASKS, types, classes)})


def test_hierarchy_matrix_marks_parents_and_leaves_orphans_unrefined():
  h = heads.hierarchy_matrix(np.array([1, 0, -1]), 2)
  np.testing.assert_array_equal(h, [[0, 1, 1], [1, 0, 1]])


def test_two_level_refinement_by_hand():
  cfg = _config(["Linear", "HierarchicalSoftmax", "Linear"], classes=(4, 3, 2))
  parents = {"fine": np.array([0, 0, 1, 2]), "mid": np.array([0, 0, -1])}
  h = heads.Hierarchy(cfg, TASKS, parents)
  z = {"fine": jnp.zeros((1, 4)), "mid": jnp.array([[1.0, 2.0, 3.0]]),
       "coarse": jnp.array([[np.log(3.0), 0.0]])}
  out = h(z)
  # softmax(coarse) = [0.75, 0.25]; mid classes 0, 1 have parent 0, class 2 none (all ones).
  np.testing.assert_allclose(out["mid"], [[1 + np.log(0.75), 2 + np.log(0.75), 3.0]], rtol=1e-6)
  np.testing.assert_array_equal(out["fine"], z["fine"])  # a Linear task is never refined
  np.testing.assert_array_equal(out["coarse"], z["coarse"])


def test_refinement_runs_top_down_from_the_coarsest_rank():
  cfg = _config(["HierarchicalSoftmax", "HierarchicalSoftmax", "Linear"], classes=(3, 2, 2))
  parents = {"fine": np.array([0, 1, 1]), "mid": np.array([1, 0])}
  h = heads.Hierarchy(cfg, TASKS, parents)
  rng = np.random.default_rng(0)
  z = {t: jnp.asarray(rng.normal(size=(2, n)), jnp.float32)
       for t, n in zip(TASKS, (3, 2, 2))}
  out = h(z)
  sm = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  mid = np.asarray(z["mid"]) + np.log(sm(np.asarray(z["coarse"]))[:, [1, 0]] + 1e-10)
  fine = np.asarray(z["fine"]) + np.log(sm(mid)[:, [0, 1, 1]] + 1e-10)
  np.testing.assert_allclose(out["mid"], mid, rtol=1e-5)
  np.testing.assert_allclose(out["fine"], fine, rtol=1e-5)  # uses the refined mid logits


def test_conditional_routing_modes():
  parents = {"fine": np.array([0, 0, 1, 1]), "mid": np.array([0, 1])}
  z = {"fine": jnp.zeros((1, 4)), "mid": jnp.array([[0.5, 0.0]]), "coarse": jnp.zeros((1, 2))}
  soft = heads.Hierarchy(_config(["ConditionalClassifier", "Linear", "Linear"]), TASKS, parents)
  p = jax.nn.softmax(jnp.array([0.5, 0.0]))
  np.testing.assert_allclose(soft(z)["fine"], jnp.log(p[jnp.array([0, 0, 1, 1])])[None],
                             rtol=1e-6)
  warm = heads.Hierarchy(_config(["ConditionalClassifier", "Linear", "Linear"], temperature=2.0),
                         TASKS, parents)
  p2 = jax.nn.softmax(jnp.array([0.25, 0.0]))
  np.testing.assert_allclose(warm(z)["fine"], jnp.log(p2[jnp.array([0, 0, 1, 1])])[None],
                             rtol=1e-6)

  hard = heads.Hierarchy(_config(["ConditionalClassifier", "Linear", "Linear"], "hard"), TASKS,
                         parents)
  out = hard(z)["fine"][0]  # eval: one-hot on parent 0
  np.testing.assert_allclose(out[:2], 0.0, atol=1e-6)
  np.testing.assert_allclose(out[2:], np.log(1e-10), rtol=1e-6)
  np.testing.assert_allclose(hard(z, train=True)["fine"], soft(z)["fine"], rtol=1e-6)

  gumbel = heads.Hierarchy(_config(["ConditionalClassifier", "Linear", "Linear"], "gumbel"),
                           TASKS, parents)
  np.testing.assert_allclose(gumbel(z)["fine"], soft(z)["fine"], rtol=1e-6)  # eval: soft
  a = gumbel(z, train=True, key=jax.random.PRNGKey(0))["fine"]
  b = gumbel(z, train=True, key=jax.random.PRNGKey(1))["fine"]
  assert not np.allclose(a, b)
  # Gumbel-softmax probabilities are unbiased for softmax only in the argmax; check the argmax
  # frequency of the perturbed parent logits against softmax([0.5, 0]).
  keys = jax.random.split(jax.random.PRNGKey(2), 4000)
  probs = jax.vmap(lambda k: heads.route(z["mid"], "gumbel", 1.0, True, k))(keys)
  freq0 = float(jnp.mean(jnp.argmax(probs[:, 0], -1) == 0))
  assert abs(freq0 - float(p[0])) < 0.03


def test_without_a_taxonomy_nothing_is_refined():
  h = heads.Hierarchy(_config(["HierarchicalSoftmax"] * 3), TASKS)
  z = {t: jnp.arange(n, dtype=jnp.float32)[None] for t, n in zip(TASKS, (4, 2, 2))}
  out = h(z)
  for t in TASKS:
    np.testing.assert_allclose(out[t], z[t], atol=1e-6)
