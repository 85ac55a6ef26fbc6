import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linnaeus_jax import losses

LOGITS = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.5]])
LOGP = np.asarray(jax.nn.log_softmax(LOGITS))
T3 = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.02, 0.18, 0.8]], np.float32)


def _lse(row):
  return np.log(np.sum(np.exp(row)))


def _one(fn, labels, **kw):
  args = dict(smoothing=0.1, null_class=False, mask_nulls=False,
              tax_matrices={"a": T3})
  args.update(kw)
  return losses.task_losses({"a": LOGITS}, {"a": jnp.asarray(labels)}, ["a"], [fn], **args)["a"]


# ----------------------------------------------------------------------------- Class weights


def test_class_weights_hand_values():
  n = np.array([0, 1, 3, 6])  # N = 10
  cw = losses.class_weights
  np.testing.assert_array_equal(cw(n, "none"), [1, 1, 1, 1])
  np.testing.assert_allclose(cw(n, "smoothing", smoothing_factor=0.1),
                             [100, 10 / 1.1, 10 / 3.1, 10 / 6.1], rtol=1e-6)
  np.testing.assert_allclose(cw(n, "capping", cap=5.0), [1, 5, 10 / 3, 10 / 6], rtol=1e-6)
  np.testing.assert_allclose(cw(n, "exponential", base=2.0),
                             [1, 1024, 2 ** (10 / 3), 2 ** (10 / 6)], rtol=1e-6)
  np.testing.assert_allclose(cw(n, "logarithmic", log_base=10.0),
                             [1, 1 / (1 + np.log10(1.9)), 1 / (1 + np.log10(3.7)),
                              1 / (1 + np.log10(6.4))], rtol=1e-6)
  np.testing.assert_allclose(cw(n, "smoothing", smoothing_factor=0.0), [1, 10, 10 / 3, 10 / 6],
                             rtol=1e-6)  # an absent class would divide by zero: 1
  assert cw(n, "capping").dtype == np.float32
  np.testing.assert_array_equal(cw(np.zeros(3), "smoothing"), [1, 1, 1])
  with pytest.raises(ValueError, match="not finite"):
    cw(np.array([1, 1000]), "exponential")
  with pytest.raises(ValueError, match="not in"):
    cw(n, "inverse")


# ----------------------------------------------------------------------------- Criteria


def test_criteria_hand_values():
  y = [0, 2, 1]
  ce = -LOGP[np.arange(3), y]
  np.testing.assert_allclose(_one("CrossEntropyLoss", y)[1], ce, rtol=1e-6)
  np.testing.assert_allclose(_one("CrossEntropyLoss", [0])[1][:1],
                             [_lse([2, 0, -1]) - 2.0], rtol=1e-6)
  np.testing.assert_allclose(_one("SoftTargetCrossEntropy", y)[1], ce, rtol=1e-6)
  ls = -(0.9 * LOGP[0, 0] + 0.05 * LOGP[0, 1] + 0.05 * LOGP[0, 2])
  np.testing.assert_allclose(_one("LabelSmoothingCrossEntropy", y)[1][0], ls, rtol=1e-6)
  tax = -(T3[2] * LOGP[1]).sum()
  np.testing.assert_allclose(_one("TaxonomyAwareLabelSmoothing", y)[1][1], tax, rtol=1e-6)
  np.testing.assert_allclose(_one("CrossEntropyLoss", y)[0], ce.mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="smoothing matrix"):
    _one("TaxonomyAwareLabelSmoothing", y, tax_matrices=None)
  with pytest.raises(ValueError, match="not in"):
    _one("FocalLoss", y)


def _rows(fn, y):
  oh = np.eye(3)[y]
  return {"CrossEntropyLoss": oh, "SoftTargetCrossEntropy": oh,
          "LabelSmoothingCrossEntropy": oh * 0.9 + (1 - oh) * 0.05,
          "TaxonomyAwareLabelSmoothing": T3[y]}[fn]


@pytest.mark.parametrize("fn", list(losses.CRITERIA))
def test_mixed_targets_are_the_lambda_combination(fn):
  y, lam, partner = np.array([0, 2, 1]), np.array([0.3, 1.0, 0.6]), np.array([1, 1, 0])
  target = lam[:, None] * _rows(fn, y) + (1 - lam[:, None]) * _rows(fn, y[partner])
  got = _one(fn, y, lam_B=jnp.asarray(lam), partner_B=jnp.asarray(partner))[1]
  np.testing.assert_allclose(got, -(target * LOGP).sum(1), rtol=1e-5)


def test_argmax_targets():
  y, lam, partner = np.array([0, 2, 1]), np.array([0.3, 1.0, 0.6]), np.array([1, 1, 0])
  mix = dict(lam_B=jnp.asarray(lam), partner_B=jnp.asarray(partner), argmax_targets=True)
  hard = np.array([2, 2, 1])  # sample 0 takes its partner's class (0.7 > 0.3)
  for fn in ("CrossEntropyLoss", "LabelSmoothingCrossEntropy", "TaxonomyAwareLabelSmoothing"):
    np.testing.assert_allclose(_one(fn, y, **mix)[1], -(_rows(fn, hard) * LOGP).sum(1),
                               rtol=1e-5)
  # SoftTargetCrossEntropy consumed the mixed target in the original too.
  soft = lam[:, None] * np.eye(3)[y] + (1 - lam[:, None]) * np.eye(3)[y[partner]]
  np.testing.assert_allclose(_one("SoftTargetCrossEntropy", y, **mix)[1],
                             -(soft * LOGP).sum(1), rtol=1e-5)


def test_class_weight_applied_once():
  y = [0, 2, 1]
  base = _one("CrossEntropyLoss", y, class_weights={"a": np.ones(3)})
  heavy = _one("CrossEntropyLoss", y, class_weights={"a": np.array([1.0, 1.0, 2.0])})
  per = np.asarray(base[1])
  np.testing.assert_allclose(base[0], per.mean(), rtol=1e-6)
  np.testing.assert_allclose(heavy[0], (per[0] + 2 * per[1] + per[2]) / 3, rtol=1e-6)
  np.testing.assert_allclose(heavy[1], per, rtol=1e-6)  # per-sample losses are unweighted
  # Mixed: w_b = lam w[y_b] + (1 - lam) w[y_partner].
  lam, partner = np.array([0.3, 1.0, 0.6]), np.array([1, 1, 0])
  mixed = _one("SoftTargetCrossEntropy", y, class_weights={"a": np.array([1.0, 3.0, 2.0])},
               lam_B=jnp.asarray(lam), partner_B=jnp.asarray(partner))
  w = np.array([0.3 * 1 + 0.7 * 2, 2.0, 0.6 * 3 + 0.4 * 1])
  np.testing.assert_allclose(mixed[0], (w * np.asarray(mixed[1])).mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- Null masking


def test_null_masking_and_task_weights():
  logits = {"a": LOGITS[:2], "b": LOGITS[:2]}
  labels = {"a": jnp.array([0, 2]), "b": jnp.array([1, 2])}
  kw = dict(smoothing=0.0, null_class=True)
  keep = losses.task_losses(logits, labels, ["a", "b"], ["CrossEntropyLoss"] * 2,
                            mask_nulls=False, **kw)
  masked = losses.task_losses(logits, labels, ["a", "b"], ["CrossEntropyLoss"] * 2,
                              mask_nulls=True, **kw)
  per = keep["a"][1]
  np.testing.assert_allclose(keep["a"][0], per.mean(), rtol=1e-6)
  np.testing.assert_allclose(masked["a"][0], per[1], rtol=1e-6)  # the null sample is excluded
  np.testing.assert_array_equal(masked["a"][2], [False, True])
  np.testing.assert_allclose(masked["b"][0], keep["b"][0], rtol=1e-6)  # no null in task b
  total = losses.total_loss(masked, ["a", "b"], [2.0, 0.5])
  np.testing.assert_allclose(total, 2.0 * masked["a"][0] + 0.5 * masked["b"][0], rtol=1e-6)
  total = losses.total_loss(masked, ["a", "b"], jnp.array([2.0, 0.5]))  # GradNorm weights
  np.testing.assert_allclose(total, 2.0 * masked["a"][0] + 0.5 * masked["b"][0], rtol=1e-6)
  np.testing.assert_allclose(losses.total_loss(masked, ["a", "b"], []),
                             masked["a"][0] + masked["b"][0], rtol=1e-6)
  # Without partial levels class 0 is a real taxon and nothing is masked.
  no_partial = losses.task_losses(logits, labels, ["a"], ["CrossEntropyLoss"], smoothing=0.0,
                                  null_class=False, mask_nulls=True)
  np.testing.assert_allclose(no_partial["a"][0], per.mean(), rtol=1e-6)


def test_all_excluded_gives_zero_not_nan():
  out = losses.task_losses({"a": LOGITS}, {"a": jnp.array([0, 0, 1])}, ["a"], ["CrossEntropyLoss"],
                           smoothing=0.0, null_class=True, mask_nulls=True,
                           example_mask_B=jnp.array([True, True, False]))
  assert float(out["a"][0]) == 0.0


def test_mixed_null_is_decided_by_the_mixed_one_hot():
  # h_0 > 0.5 decides, not the sample's own label: sample 0 (null) keeps 0.4 of itself: not null;
  # sample 1 (class 2) takes 0.6 of a null: null; sample 2 (null) keeps 0.6: null.
  out = _one("CrossEntropyLoss", [0, 2, 0], null_class=True, mask_nulls=True,
             lam_B=jnp.array([0.4, 0.4, 0.6]), partner_B=jnp.array([1, 0, 1]))
  np.testing.assert_array_equal(out[2], [True, False, False])


def test_null_keep_probability():
  b = 20000
  y = jnp.asarray(np.arange(b) % 2)  # even rows null
  z = jnp.zeros((b, 3))
  run = jax.jit(lambda p, key, pad: losses.task_losses(
      {"a": z, "b": z}, {"a": y, "b": y}, ["a", "b"], ["CrossEntropyLoss"] * 2, smoothing=0.0,
      null_class=True, mask_nulls=False, example_mask_B=pad, null_keep_prob=p, key=key))
  key, pad = jax.random.key(0), jnp.ones(b, bool)
  every, none = run(1.0, key, pad), run(0.0, key, pad)
  assert bool(every["a"][2].all())
  np.testing.assert_array_equal(none["a"][2], np.arange(b) % 2 == 1)
  phase1 = _one("CrossEntropyLoss", [0, 2, 1], null_class=True, mask_nulls=True,
                null_keep_prob=1.0, key=key)  # Phase 1 takes precedence
  np.testing.assert_array_equal(phase1[2], [False, True, True])
  out = run(0.3, key, pad)
  for t in ("a", "b"):
    inc = np.asarray(out[t][2])
    assert inc[1::2].all()  # non-null samples always kept
    n = b // 2
    assert abs(inc[::2].sum() - 0.3 * n) < 4 * np.sqrt(n * 0.3 * 0.7)
  assert (np.asarray(out["a"][2]) != np.asarray(out["b"][2])).any()  # independent per task
  padded = run(1.0, key, pad.at[1].set(False))
  assert not bool(padded["a"][2][1])
  with pytest.raises(ValueError, match="key"):
    _one("CrossEntropyLoss", [0, 1, 2], null_class=True, null_keep_prob=0.5)


def test_jit_with_everything():
  @jax.jit
  def f(logits, y, lam, partner, t, w, p, key):
    out = losses.task_losses({"a": logits}, {"a": y}, ["a"], ["TaxonomyAwareLabelSmoothing"],
                             smoothing=0.1, null_class=True, mask_nulls=False, lam_B=lam,
                             partner_B=partner, tax_matrices={"a": t}, class_weights={"a": w},
                             null_keep_prob=p, key=key)
    return losses.total_loss(out, ["a"], jnp.array([0.5]))

  y, lam, partner = jnp.array([1, 2, 1]), jnp.array([0.3, 1.0, 0.6]), jnp.array([1, 1, 0])
  got = f(LOGITS, y, lam, partner, jnp.asarray(T3), jnp.array([1.0, 2.0, 3.0]), 0.5,
          jax.random.key(1))
  target = lam[:, None] * T3[y] + (1 - lam[:, None]) * T3[y[partner]]
  w = np.array([0.3 * 2 + 0.7 * 3, 3.0, 0.6 * 2 + 0.4 * 2])
  np.testing.assert_allclose(got, 0.5 * (w * -(target * LOGP).sum(1)).mean(), rtol=1e-5)
