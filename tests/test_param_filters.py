import pytest

from linnaeus_jax import param_filters


def test_filter_language():
  f = param_filters.parse("not endswith:bias and (ndim:2 or regex:'a/(b|c)') or all and none")
  assert f("x/kernel", (2, 2)) and not f("x/bias", (2, 2)) and f("a/c/scale", (3,))
  assert not f("x/scale", (3,))
  assert param_filters.parse("min_ndim:2 and max_ndim:3")("x", (1, 2, 3))
  assert param_filters.parse('contains:"a b"')("x a b", ())
  assert param_filters.parse("ndim:2,4")("k", (1, 1, 1, 1))
  for bad in ("", "contains:a and", "(ndim:2", "size:3", "ndim:x", "regex:'('", "bogus", "a b"):
    with pytest.raises(ValueError):
      param_filters.parse(bad)
    assert param_filters.problem(bad)
  assert param_filters.problem("decayable or contains:token") is None


def test_joined_rules_bind_and_before_or():
  f = param_filters.parse("contains:a or contains:b and contains:c")  # a or (b and c)
  assert f("a", ()) and f("bc", ()) and not f("b", ())
  assert not param_filters.parse("(contains:a or contains:b) and contains:c")("a", ())


def test_decayable_is_the_default_weight_decay_rule():
  assert param_filters.decayable("stage3/blocks/attn/qkv/kernel", (4, 8))
  for path, shape in (("x/bias", (4, 8)), ("x/freqs", (4, 8)), ("cls_token_1", (1, 8)),
                      ("final_norm/norm/scale", (8, 8)), ("x/kernel", (8,))):
    assert not param_filters.decayable(path, shape), path
