import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax import contrib

from linnaeus_jax import config as config_lib, models, optim

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)


def _sm_config():
  c = config_lib.base_config()
  config_lib.set_model_size(c, "sm")
  c.data.meta.components.ELEVATION.enabled = True
  c.schedule.meta_masking.end_fraction = 0.5
  for head in c.model.classification.heads.values():
    head.num_classes = 7
  return c


@pytest.fixture(scope="module")
def sm_params():
  c = _sm_config()
  _, params, _ = models.abstract(c)
  return nnx.to_pure_dict(params)


def _leaves(tree):
  return {optim._path(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _realistic_groups(c, order=("heads", "rope", "attn_mlp", "convs")):
  pg = c.optimizer.parameter_groups
  pg.enabled = True
  pg.groups.heads = dict(filter="startswith:head/", lr_multiplier=10.0)
  pg.groups.rope = dict(filter="endswith:/freqs", weight_decay=0.0)
  pg.groups.attn_mlp = dict(filter="regex:'stage[34]/blocks/(attn|mlp)/' and ndim:2",
                            optimizer="muon")
  pg.groups.convs = dict(filter="ndim:4 and not startswith:stem", optimizer="sgd")
  pg.order = list(order)
  return c


def _expected_group(path, shape):
  """The realistic groups written out by hand (shape: the stored, possibly stacked, shape)."""
  per_block = len(shape) - (1 if "/blocks/" in path else 0)
  if path.startswith("head/"):
    return "heads"
  if path.endswith("/freqs"):
    return "rope"
  if re.match(r"stage[34]/blocks/(attn|mlp)/", path) and per_block == 2:
    return "attn_mlp"
  if per_block == 4 and not path.startswith("stem"):
    return "convs"
  return "default"


def test_sm_groups_first_match_wins_and_default_catches_the_rest(sm_params):
  c = _realistic_groups(_sm_config())
  config_lib.validate(c, need_data=False)
  labels = _leaves(optim.param_labels(c, sm_params))
  leaves = _leaves(sm_params)
  assert labels.keys() == leaves.keys()
  assert {p: labels[p] for p in leaves} == {p: _expected_group(p, x.shape)
                                           for p, x in leaves.items()}
  # Per-block ranks: a stacked bias (depth, C) is not a matrix; a stacked depthwise kernel is 4-D.
  assert labels["stage3/blocks/attn/qkv/kernel"] == "attn_mlp"
  assert labels["stage3/blocks/attn/qkv/bias"] == "default"
  assert labels["stage0/blocks/dwconv/kernel"] == labels["down1/conv/kernel"] == "convs"
  assert labels["stem_conv/kernel"] == "default"
  assert labels["head/taxa_L10/fc/kernel"] == "heads"
  # Each parameter in exactly one group: the table adds up to the whole tree.
  table = optim.group_table(c, sm_params)
  assert [r["group"] for r in table] == ["heads", "rope", "attn_mlp", "convs", "default"]
  assert sum(r["tensors"] for r in table) == len(leaves)
  assert sum(r["params"] for r in table) == sum(x.size for x in leaves.values())
  assert all(r["tensors"] > 0 for r in table)
  rows = {r["group"]: r for r in table}
  assert rows["heads"]["tensors"] == 8 and rows["rope"]["tensors"] == 2
  assert rows["convs"]["optimizer"] == "sgd" and rows["default"]["optimizer"] == "adamw"
  assert rows["attn_mlp"]["adamw_tensors"] == 0 and rows["rope"]["weight_decay"] == 0.0
  # First match wins: with a rank-2 group first, the head kernels go there instead.
  c.optimizer.parameter_groups.groups.mats = dict(filter="ndim:2")
  c.optimizer.parameter_groups.order = ["mats", "heads", "rope", "attn_mlp", "convs"]
  labels = _leaves(optim.param_labels(c, sm_params))
  assert labels["head/taxa_L10/fc/kernel"] == labels["stage3/blocks/attn/qkv/kernel"] == "mats"
  assert labels["head/taxa_L10/fc/bias"] == "heads"


def test_sm_weight_decay_mask(sm_params):
  c = _sm_config()
  mask = _leaves(optim.decay_mask(c, optim.groups(c)[0], sm_params))
  decayed = {p for p, m in mask.items() if m}
  assert decayed == {p for p in mask if p.endswith("/kernel")}
  for p in ("cls_token_1", "cls_token_2", "meta_1/missing_tokens", "stage3/blocks/attn/freqs",
            "stage0/blocks/gamma", "stage3/blocks/norm1/norm/scale", "final_norm/norm/bias",
            "stage3/blocks/attn/qkv/bias", "aggregate_w"):
    assert p in mask and not mask[p], p
  assert optim.group_table(c, sm_params)[0]["decayed"] == len(decayed) == 42
  # A group may say otherwise.
  c.optimizer.parameter_groups.default.decay = "decayable or endswith:bias"
  mask = _leaves(optim.decay_mask(c, optim.groups(c)[0], sm_params))
  assert mask["stage3/blocks/attn/qkv/bias"] and not mask["stage3/blocks/norm1/norm/scale"]


def _small_config(**lr):
  c = config_lib.base_config()
  c.schedule.meta_masking.end_fraction = 0.5
  c.train.clip_grad = 0.0
  s = c.lr_scheduler
  s.name, s.base_lr, s.warmup_lr, s.min_lr, s.warmup_steps = "constant", 1e-2, 1e-2, 0.0, 0
  for k, v in lr.items():
    s[k] = v
  return c


def _tree(key=0):
  k = jax.random.split(jax.random.key(key), 6)
  return {"blocks": {"w": jax.random.normal(k[0], (3, 8, 16))},
          "conv": {"kernel": jax.random.normal(k[1], (3, 3, 4, 8))},
          "fc": {"kernel": jax.random.normal(k[2], (8, 16)), "bias": jax.random.normal(k[3], (16,))},
          "head": {"kernel": jax.random.normal(k[4], (16, 5))},
          "pos": jax.random.normal(k[5], (2, 3, 4))}


def _run(tx, params, grads_list):
  state, out = tx.init(params), []
  for g in grads_list:
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


def test_decay_mask_in_the_update():
  c = _small_config()
  params = {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "norm": {"scale": jnp.ones(3)}, "cls_token_1": jnp.ones((1, 1, 3))}
  tx, _ = optim.build(c, 10, 1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  (u,) = _run(tx, params, [zeros])
  np.testing.assert_allclose(u["fc"]["kernel"], -1e-2 * 0.05 * np.ones((2, 3)), rtol=1e-6)
  assert not (np.any(u["fc"]["bias"]) or np.any(u["norm"]["scale"]) or np.any(u["cls_token_1"]))


# ----------------------------------------------------------------------------- LR schedules

T, W, PEAK, LOW, START = 110, 10, 1e-3, 1e-4, 1e-5


def _closed_form(name, t, decay_steps=30, decay_rate=0.5, stable=0.5, dur=0.3, kind="cosine"):
  if t < W:
    return START + (PEAK - START) * t / W
  u, d = t - W, T - W
  cos = lambda f: LOW + 0.5 * (PEAK - LOW) * (1 + np.cos(np.pi * f))
  lin = lambda f: PEAK - (PEAK - LOW) * f
  if name == "cosine":
    return cos(min(u / d, 1))
  if name == "linear":
    return lin(min(u / d, 1))
  if name == "step":
    return max(PEAK * decay_rate ** (u // decay_steps), LOW)
  if name == "wsd":
    s, dd = int(stable * d), int(dur * d)
    return {"cosine": cos, "linear": lin}[kind](min(max((u - s) / dd, 0), 1))
  return PEAK


@pytest.mark.parametrize("name,kind", [("cosine", ""), ("linear", ""), ("step", ""),
                                       ("wsd", "cosine"), ("wsd", "linear"), ("constant", "")])
def test_lr_closed_forms(name, kind):
  c = _small_config(name=name, base_lr=PEAK, warmup_lr=START, min_lr=LOW, warmup_steps=W,
                    decay_steps=30, decay_rate=0.5, stable_duration_fraction=0.5,
                    decay_duration_fraction=0.3, decay_type=kind or "cosine")
  config_lib.validate(c, need_data=False)
  _, scheds = optim.build(c, T, 11)
  lr = scheds["default"]
  mid = {"cosine": 60, "linear": 60, "step": 45, "wsd": 75, "constant": 60}[name]
  points = [0, 5, W - 1, W, mid, T - 1]
  if name == "step":
    points += [W + 29, W + 30, W + 60]
  if name == "wsd":
    points += [W + 49, W + 50, W + 80, W + 85]
  for t in points:
    want = _closed_form(name, t, kind=kind or "cosine")
    np.testing.assert_allclose(float(lr(t)), want, rtol=2e-5, err_msg=f"{name} {kind} t={t}")
  assert float(lr(0)) == pytest.approx(START) and float(lr(W)) == pytest.approx(PEAK)


def test_step_decay_stops_at_min_lr():
  c = _small_config(name="step", base_lr=PEAK, min_lr=LOW, warmup_steps=W, decay_steps=10,
                    decay_rate=0.1)
  _, scheds = optim.build(c, T, 11)
  np.testing.assert_allclose([float(scheds["default"](t)) for t in (W, W + 10, W + 20, W + 90)],
                             [PEAK, PEAK / 10, LOW, LOW], rtol=1e-5)


def test_warmup_precedence_steps_then_fraction_then_epochs():
  c = _small_config(warmup_steps=7, warmup_fraction=0.2, warmup_epochs=3.0)
  assert optim.lr_spec(c, 110, 10).warmup == 7
  c.lr_scheduler.warmup_steps = 0
  assert optim.lr_spec(c, 110, 10).warmup == 22
  c.lr_scheduler.warmup_fraction = -1.0
  assert optim.lr_spec(c, 110, 10).warmup == 30


def test_batch_scaling_applies_at_every_step():
  c = _small_config(name="cosine", base_lr=PEAK, warmup_lr=START, min_lr=LOW, warmup_steps=W)
  c.data.batch_size = 64
  _, plain = optim.build(c, T, 11)
  c.lr_scheduler.scale_by_batch, c.lr_scheduler.reference_bs = True, 512
  _, scaled = optim.build(c, T, 11)
  steps = jnp.arange(T + 5)
  np.testing.assert_allclose(jax.vmap(scaled["default"])(steps),
                             0.125 * jax.vmap(plain["default"])(steps), rtol=1e-6)
  assert float(scaled["default"](W)) == pytest.approx(0.125 * PEAK)
  assert float(scaled["default"](T - 1)) > 0.125 * LOW * 0.999  # the whole curve, min included


@pytest.mark.slow
def test_group_multipliers_scale_schedule_and_update():
  c = _small_config(name="cosine", base_lr=PEAK, warmup_lr=START, min_lr=LOW, warmup_steps=W)
  c.optimizer.weight_decay = 0.0
  pg = c.optimizer.parameter_groups
  pg.enabled, pg.order = True, ["head", "fc"]
  pg.groups.head = dict(filter="startswith:head/", lr_multiplier=10.0)
  pg.groups.fc = dict(filter="startswith:fc/", lr_multiplier=0.5)
  tx, scheds = optim.build(c, T, 11)
  assert list(scheds) == ["head", "fc", "default"]
  steps = jnp.arange(T)
  base = jax.vmap(scheds["default"])(steps)
  np.testing.assert_allclose(jax.vmap(scheds["head"])(steps), 10 * base, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(scheds["fc"])(steps), 0.5 * base, rtol=1e-6)
  params = _tree()
  grads = jax.tree.map(jnp.ones_like, params)
  (u,) = _run(tx, params, [grads])  # Adam's first step: -lr * g / (|g| + eps) = -lr(0)
  np.testing.assert_allclose(u["head"]["kernel"], -10 * START, rtol=1e-4)
  np.testing.assert_allclose(u["fc"]["bias"], -0.5 * START, rtol=1e-4)
  np.testing.assert_allclose(u["conv"]["kernel"], -START, rtol=1e-4)


# ----------------------------------------------------------------------------- Optimizers


def test_muon_updates_only_matrices_per_block():
  c = _small_config()
  c.optimizer.name = "muon"
  c.optimizer.weight_decay = 0.0
  params = _tree()
  grads = [_tree(1), _tree(2)]
  tx, _ = optim.build(c, 10, 1)
  ours = _run(tx, params, grads)[-1]
  lr, m = 1e-2, c.optimizer.muon

  def ref_muon(p, gs):  # optax's own muon on one 2-D matrix
    t = contrib.muon(lr, beta=m.momentum, nesterov=True, ns_steps=m.ns_steps)
    return _run(t, {"w": p}, [{"w": g} for g in gs])[-1]["w"]

  fc = ref_muon(params["fc"]["kernel"], [g["fc"]["kernel"] for g in grads])
  np.testing.assert_allclose(ours["fc"]["kernel"], fc, rtol=2e-4, atol=1e-7)
  for i in range(3):  # a stacked (scanned) matrix: Muon per block
    blk = ref_muon(params["blocks"]["w"][i], [g["blocks"]["w"][i] for g in grads])
    np.testing.assert_allclose(ours["blocks"]["w"][i], blk, rtol=2e-4, atol=1e-7)
  conv = ref_muon(params["conv"]["kernel"].reshape(36, 8),
                  [g["conv"]["kernel"].reshape(36, 8) for g in grads])  # HWIO -> (H*W*I, O)
  np.testing.assert_allclose(ours["conv"]["kernel"], conv.reshape(3, 3, 4, 8), rtol=2e-4,
                             atol=1e-7)
  # The bias, a 3-D tensor and the head (optimizer.muon.adamw_filter) get AdamW's update.
  adamw = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  ref = _run(adamw, params, grads)[-1]
  for path in (("fc", "bias"), ("head", "kernel")):
    np.testing.assert_allclose(ours[path[0]][path[1]], ref[path[0]][path[1]], rtol=1e-5)
  np.testing.assert_allclose(ours["pos"], ref["pos"], rtol=1e-5)
  for path in (("fc", "kernel"), ("blocks", "w"), ("conv", "kernel")):
    u = ours[path[0]][path[1]]
    assert u.shape == params[path[0]][path[1]].shape and bool(jnp.isfinite(u).all())
    assert not np.allclose(u, ref[path[0]][path[1]], rtol=0.1)


def test_sgd_is_nesterov_with_coupled_weight_decay():
  c = _small_config()
  c.optimizer.name = "sgd"
  params = {"fc": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)}}
  grads = [jax.tree.map(lambda x, s=s: x * s, params) for s in (0.3, -1.0, 0.5)]
  c.optimizer.weight_decay = 0.0
  ours = _run(optim.build(c, 10, 1)[0], params, grads)
  ref = _run(optax.sgd(1e-2, momentum=0.9, nesterov=True), params, grads)
  for a, b in zip(ours, ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
  c.optimizer.weight_decay = 0.1  # torch.optim.SGD: g + wd * p before the momentum (not biases)
  ours = _run(optim.build(c, 10, 1)[0], params, grads)
  sgd = optax.sgd(1e-2, momentum=0.9, nesterov=True)
  wd = [{"fc": {"kernel": g["fc"]["kernel"] + 0.1 * params["fc"]["kernel"],
                "bias": g["fc"]["bias"]}} for g in grads]
  ref = _run(sgd, params, wd)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours[-1], ref[-1])


def test_ademamix_matches_optax_contrib_and_beta3_warmup():
  c = _small_config()
  c.optimizer.name = "ademamix"
  c.optimizer.weight_decay = 0.0
  params = {"fc": {"kernel": jnp.full((2, 3), 2.0)}}
  grads = [jax.tree.map(lambda x, s=s: x * s, params) for s in (0.3, -1.0)]
  ours = _run(optim.build(c, 10, 1)[0], params, grads)[-1]
  ref = _run(contrib.ademamix(1e-2, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0), params, grads)[-1]
  np.testing.assert_allclose(ours["fc"]["kernel"], ref["fc"]["kernel"], rtol=1e-6)
  b3 = optim._beta3(0.9, 0.9999, 100)
  assert float(b3(-1)) == pytest.approx(0.9) and float(b3(99)) == pytest.approx(0.9999)
  assert 0.9 < float(b3(49)) < 0.9999


# ----------------------------------------------------------------------------- Validation


def test_validate_reports_bad_groups_clearly():
  c = _sm_config()
  c.data.h5.labels_path = "x"
  pg = c.optimizer.parameter_groups
  pg.enabled = True
  pg.groups.a = dict(filter="contains:head and (", optimizer="adam")
  pg.groups.b = dict(filter="ndim:2", lr_multiplier=0.0)
  pg.groups.c = dict(filter="")
  pg.order = ["a", "b", "zz"]
  c.lr_scheduler.name = "cosine_restarts"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  for part in ("groups.a.filter 'contains:head and ('", "groups.a.optimizer 'adam' not in",
               "groups.b.lr_multiplier must be > 0", "names 'zz'", "groups.c is not in",
               "groups.c.filter is empty", "lr_scheduler.name 'cosine_restarts'"):
    assert part in msg, part
  with pytest.raises(config_lib.ConfigError, match="lr_multiplyer"):
    config_lib.param_group_template(filter="all", lr_multiplyer=2.0)
  pg.groups.b.lr_multiplyer = 2.0
  with pytest.raises(config_lib.ConfigError, match="unknown key optimizer.parameter_groups."
                     "groups.b.lr_multiplyer"):
    config_lib.validate(c)


def test_registries_match_the_config_constants():
  assert tuple(optim.OPTIMIZERS) == config_lib.OPTIMIZERS
  assert tuple(optim._DECAYS) == config_lib.LR_SCHEDULES
  assert tuple(optim._ANNEAL) == config_lib.DECAY_TYPES
