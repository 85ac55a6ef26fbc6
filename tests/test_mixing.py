import jax
import jax.numpy as jnp
import numpy as np

from linnaeus_jax import mixing

B, H, W = 8, 16, 16
PAIR_OK = jnp.array([True, True, False, False, True, True, True, True])


def _batch(key=0):
  ks = jax.random.split(jax.random.PRNGKey(key), 3)
  image = jax.random.normal(ks[0], (B, H, W, 3))
  meta = {"TEMPORAL": jax.random.normal(ks[1], (B, 2)), "SPATIAL": jax.random.normal(ks[2], (B, 3))}
  valid = jnp.array([[True, True], [True, False], [True, True], [False, True],
                     [False, False], [True, True], [True, True], [True, True]])
  return image, meta, valid


def _run(cfg, p=1.0, key=1):
  image, meta, valid = _batch()
  out = jax.jit(lambda k, i, m, v: mixing.mix_batch(k, cfg, p, i, m, v, PAIR_OK))(
      jax.random.PRNGKey(key), image, meta, valid)
  return (image, meta, valid), out


def test_partner_swaps_adjacent_pairs():
  np.testing.assert_array_equal(mixing.partner(jnp.arange(6)), [1, 0, 3, 2, 5, 4])


def test_mixup_mixes_partners_only_and_leaves_unmixable_samples():
  cfg = mixing.MixConfig(mixup=True, cutmix=False, components=("TEMPORAL", "SPATIAL"))
  (image, meta, valid), (out, meta_out, valid_out, lam_B, partner_B, applied) = _run(cfg)
  assert bool(applied)
  lam = float(lam_B[0])
  assert 0 < lam < 1 and np.allclose(lam_B[PAIR_OK], lam) and np.all(lam_B[~PAIR_OK] == 1.0)
  np.testing.assert_array_equal(partner_B, [1, 0, 3, 2, 5, 4, 7, 6])
  np.testing.assert_allclose(out[0], lam * image[0] + (1 - lam) * image[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1], lam * image[1] + (1 - lam) * image[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[2:4], image[2:4])  # pair_ok False: untouched
  np.testing.assert_array_equal(valid_out[2:4], valid[2:4])
  for name in meta:
    np.testing.assert_array_equal(meta_out[name][2:4], meta[name][2:4])
  # Metadata: values from one source per sample; a component valid only if valid on both sides.
  np.testing.assert_array_equal(valid_out[0], [True, False])
  np.testing.assert_array_equal(valid_out[1], [True, False])
  np.testing.assert_array_equal(valid_out[4], [False, False])  # masked stays masked
  for i in (0, 1, 4, 5, 6, 7):
    own = all(np.array_equal(meta_out[n][i], meta[n][i]) for n in meta)
    other = all(np.array_equal(meta_out[n][i], meta[n][i ^ 1]) for n in meta)
    assert own or other


def test_prefer_valid_takes_the_valid_side():
  cfg = mixing.MixConfig(mixup=True, cutmix=False, meta_mix="prefer_valid",
                         components=("TEMPORAL", "SPATIAL"))
  (_, meta, _), (_, meta_out, valid_out, *_) = _run(cfg)
  np.testing.assert_array_equal(valid_out[0], [True, True])
  np.testing.assert_array_equal(meta_out["SPATIAL"][1], meta["SPATIAL"][0])  # 1 lacks SPATIAL


def test_cutmix_pastes_one_box_and_adjusts_lambda():
  cfg = mixing.MixConfig(mixup=False, cutmix=True, cutmix_minmax=(0.3, 0.7),
                         components=("TEMPORAL", "SPATIAL"))
  for key in range(5):
    (image, _, _), (out, _, _, lam_B, _, _) = _run(cfg, key=key)
    from_partner = np.all(np.asarray(out[0]) == np.asarray(image[1]), axis=-1)
    from_self = np.all(np.asarray(out[0]) == np.asarray(image[0]), axis=-1)
    assert np.all(from_partner | from_self)
    rows, cols = np.nonzero(from_partner)
    if len(rows):  # a single rectangle
      assert from_partner[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    np.testing.assert_allclose(lam_B[0], 1 - from_partner.mean(), rtol=1e-6)
    np.testing.assert_array_equal(from_partner, np.all(np.asarray(out[1]) == np.asarray(image[0]),
                                                       axis=-1))  # same box for the partner


def test_batch_probability_is_drawn_once():
  cfg = mixing.MixConfig(mixup=True, cutmix=False, components=("TEMPORAL", "SPATIAL"))
  image, meta, valid = _batch()
  fn = jax.jit(jax.vmap(lambda k: mixing.mix_batch(k, cfg, 0.3, image, meta, valid, PAIR_OK)[5]))
  applied = fn(jax.random.split(jax.random.PRNGKey(0), 5_000))
  freq = float(applied.mean())
  assert abs(freq - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 5_000)  # p, not p^2
  assert not bool(_run(cfg, p=0.0)[1][5])
