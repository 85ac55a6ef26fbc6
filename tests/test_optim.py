import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax import contrib

from linnaeus_jax import config as config_lib, models, optim

from conftest import tiny_config  # conftest also puts the repository on sys.path


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


def test_warmup_is_one_duration():
  c = _small_config(warmup_steps=7, warmup_epochs=3.0)
  with pytest.raises(config_lib.ConfigError, match="lr_scheduler.warmup_steps=7 and "
                     "lr_scheduler.warmup_epochs=3.0 are both set"):
    optim.lr_spec(c, 110, 10)
  for member, value, steps in (("steps", 7, 7), ("fraction", 0.2, 22), ("epochs", 3.0, 30)):
    c = _small_config(**{f"warmup_{member}": value})
    assert optim.lr_spec(c, 110, 10).warmup == steps, member
  c = _small_config(warmup_fraction=0.0)  # none set: the default, 5 epochs
  assert optim.lr_spec(c, 110, 10).warmup == 50
  assert optim.lr_spec(c, 40, 10).warmup == 39  # at most total - 1


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


# ----------------------------------------------------------------------------- Fine-tuning

FREEZE = "startswith:stage0/ or startswith:stem_"


def _tiny_model_config(scan=True, **opt):
  """conftest's tiny mFormerV1 (no data read) with depths (2, 1 | 3, 2): L = 8, heads at id 9;
  constant LR 1e-2, no clipping."""
  c = _small_config()
  t = tiny_config("/unused")
  c.model, c.data = t.model, t.data
  for task in c.data.task_keys_h5:
    c.model.classification.heads[task].num_classes = 3
  c.model.convnext_stages.depths, c.model.rope_stages.depths = [2, 1], [3, 2]
  c.model.scan_blocks = scan
  for k, v in opt.items():
    c.optimizer[k] = v
  return c


def _random_like(tree, seed):
  """Standard normal numpy leaves (eager jax would compile one op per leaf shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), tree)


def _run_jit(tx, params, grads_list):
  """_run compiled (eager optax on a whole model compiles ops per leaf shape); numpy updates."""
  update = jax.jit(tx.update)
  state, out = jax.jit(tx.init)(params), []
  for g in grads_list:
    u, state = update(g, state, params)
    out.append(jax.tree.map(np.asarray, u))
  return out


def _tiny_params(c):
  _, params, _ = models.abstract(c)
  return _random_like(nnx.to_pure_dict(params), 0)


def _frozen(path):
  return path.startswith("stage0/") or path.startswith("stem_")


def _frozen_grads(params, seed, scale):
  """Standard normal gradients, the frozen leaves' multiplied by `scale`."""
  return jax.tree_util.tree_map_with_path(
      lambda k, g: scale * g if _frozen(optim._path(k)) else g, _random_like(params, seed))


def test_freeze_adamw_no_update_and_no_state():
  c = _tiny_model_config(freeze=FREEZE)
  c.train.clip_grad = 1.0
  params = _tiny_params(c)
  paths = _leaves(params)
  frozen = {p for p in paths if _frozen(p)}
  assert len(frozen) == 2 + 2 + 9  # stem conv (kernel, bias), stem norm, stage0 (stacked)
  tx, scheds = optim.build(c, 10, 1)
  assert list(scheds) == ["default"]
  state, p, step = jax.jit(tx.init)(params), params, jax.jit(tx.update)
  for seed in (1, 2, 3):
    u, state = step(_frozen_grads(params, seed, 1.0), state, p)
    p = jax.jit(optax.apply_updates)(p, u)
  new = _leaves(jax.tree.map(np.asarray, p))
  for path in frozen:
    np.testing.assert_array_equal(new[path], paths[path], err_msg=path)
  assert not any(np.array_equal(new[q], paths[q]) for q in paths if q not in frozen)
  # No moments for frozen tensors: AdamW keeps mu and nu per trainable tensor only.
  n_leaves = lambda t: len(jax.tree.leaves(jax.eval_shape(t.init, params)))
  plain, _ = optim.build(_tiny_model_config(), 10, 1)
  assert n_leaves(plain) - n_leaves(tx) == 2 * len(frozen)


def test_freeze_zeroes_gradients_before_clipping():
  c = _tiny_model_config(freeze=FREEZE, name="sgd", momentum=0.0, weight_decay=0.0)
  c.train.clip_grad = 1.0
  params = _tiny_params(c)
  # Large frozen gradients: were they in the clipping norm, every other update would shrink.
  grads = _frozen_grads(params, 1, 100.0)
  zeroed = _frozen_grads(params, 1, 0.0)
  norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(zeroed))))
  assert norm > 10 * c.train.clip_grad  # clipping is active
  tx, _ = optim.build(c, 10, 1)
  (ours,) = _run_jit(tx, params, [grads])
  (ref,) = _run_jit(tx, params, [zeroed])
  ours, ref, g = _leaves(ours), _leaves(ref), _leaves(grads)
  for q in g:
    np.testing.assert_array_equal(ours[q], ref[q], err_msg=q)
    want = 0.0 * g[q] if _frozen(q) else -1e-2 * g[q] * c.train.clip_grad / norm
    np.testing.assert_allclose(ours[q], want, rtol=1e-5, atol=0, err_msg=q)


def test_freeze_wins_over_groups_and_has_its_own_table_row():
  c = _tiny_model_config(freeze=FREEZE)
  pg = c.optimizer.parameter_groups
  pg.enabled, pg.order = True, ["convs"]
  pg.groups.convs = dict(filter="ndim:4", optimizer="sgd")
  params = _tiny_params(c)
  labels = _leaves(optim.param_labels(c, params))
  assert labels["stem_conv/kernel"] == labels["stage0/blocks/dwconv/kernel"] == "frozen"
  assert labels["stage1/blocks/dwconv/kernel"] == labels["down0/conv/kernel"] == "convs"
  assert labels["head/taxa_L10/fc/kernel"] == "default"
  leaves = _leaves(params)
  frozen = {p for p in leaves if _frozen(p)}
  rows = {r["group"]: r for r in optim.group_table(c, params)}
  assert list(rows) == ["frozen", "convs", "default"]
  assert rows["frozen"]["tensors"] == len(frozen) and rows["frozen"]["optimizer"] == "none"
  assert rows["frozen"]["params"] == sum(leaves[p].size for p in frozen)
  assert rows["convs"]["tensors"] == 4  # stage1's dwconv, down0/1/2 (not stem_conv, stage0)
  assert sum(r["tensors"] for r in rows.values()) == len(leaves)
  assert sum(r["params"] for r in rows.values()) == sum(x.size for x in leaves.values())
  c.optimizer.freeze = ""
  assert "frozen" not in [r["group"] for r in optim.group_table(c, params)]
  # 'frozen' is the reserved label while freezing.
  c.optimizer.freeze = FREEZE
  c.optimizer.parameter_groups.groups.frozen = dict(filter="none")
  c.optimizer.parameter_groups.order = ["convs", "frozen"]
  with pytest.raises(ValueError, match="reserved"):
    optim.build(c, 10, 1)


def _expected_layer_id(path, block=None):
  """The layer ids of the depths (2, 1 | 3, 2) written out by hand (L = 8)."""
  top = path.split("/")[0]
  m = re.match(r"(stage[0134])/blocks/(\d+)/", path)
  if block is None and m:
    block = int(m.group(2))
  first = {"stage0": 1, "stage1": 3, "stage3": 4, "stage4": 7}
  fixed = {"stem_conv": 0, "stem_norm": 0, "down0": 3, "down1": 4, "cls_token_1": 4,
           "meta_1": 4, "down2": 7, "cls_token_2": 7, "meta_2": 7}
  if top in first:
    return first[top] + block
  return fixed.get(top, 9)


@pytest.mark.parametrize("scan,decay", [(True, 0.75), (False, 0.75), (True, 1.0)])
def test_layer_decay_scales_each_block(scan, decay):
  c = _tiny_model_config(scan, name="sgd", momentum=0.0, weight_decay=0.0, layer_decay=decay)
  config_lib.validate(c, need_data=False)
  assert optim.num_layers(c) == 8
  params = _tiny_params(c)
  grads = _random_like(params, 1)
  (u,) = _run_jit(optim.build(c, 10, 1)[0], params, [grads])
  u, g = _leaves(u), _leaves(grads)
  assert u.keys() == g.keys()
  seen = set()
  for path, gi in g.items():
    if scan and re.match(r"stage[0134]/blocks/", path):  # stacked: one factor per block
      want = np.stack([-1e-2 * gi[i] * decay ** (9 - _expected_layer_id(path, i))
                       for i in range(gi.shape[0])])
      seen |= {_expected_layer_id(path, i) for i in range(gi.shape[0])}
    else:
      want = -1e-2 * gi * decay ** (9 - _expected_layer_id(path))
      seen.add(_expected_layer_id(path))
    np.testing.assert_allclose(u[path], want, rtol=1e-6, err_msg=path)
  assert seen == set(range(10))  # every id from the stem (0) to the heads (9)
  head = "head/taxa_L10/fc/kernel"
  np.testing.assert_allclose(u[head], -1e-2 * g[head], rtol=1e-6)
  qkv = "stage3/blocks/attn/qkv/kernel" if scan else "stage3/blocks/2/attn/qkv/kernel"
  scales = _leaves(optim.layer_scales(c, params))
  if scan:
    assert scales[qkv].shape == (3, 1, 1)
    np.testing.assert_allclose(scales[qkv].ravel(), [decay ** 5, decay ** 4, decay ** 3])
  else:
    assert scales[qkv] == pytest.approx(decay ** 3)


def test_layer_decay_scales_decoupled_weight_decay_and_keeps_frozen_frozen():
  c = _tiny_model_config(layer_decay=0.5, freeze="startswith:stem_")
  params = _tiny_params(c)
  zeros = jax.tree.map(np.zeros_like, params)
  (u,) = _run_jit(optim.build(c, 10, 1)[0], params, [zeros])
  u, p = _leaves(u), _leaves(params)
  # AdamW on zero gradients: only the decoupled decay -lr * wd * p, times the layer factor.
  for path, blocks in (("stage3/blocks/mlp/fc1/kernel", (4, 5, 6)),
                       ("stage4/blocks/attn/proj/kernel", (7, 8))):
    want = np.stack([-1e-2 * 0.05 * p[path][i] * 0.5 ** (9 - b) for i, b in enumerate(blocks)])
    np.testing.assert_allclose(u[path], want, rtol=1e-6, err_msg=path)
  np.testing.assert_allclose(u["down0/conv/kernel"], -1e-2 * 0.05 * p["down0/conv/kernel"]
                             * 0.5 ** 6, rtol=1e-6)
  np.testing.assert_allclose(u["head/taxa_L10/fc/kernel"],
                             -1e-2 * 0.05 * p["head/taxa_L10/fc/kernel"], rtol=1e-6)
  assert not np.any(u["stem_conv/kernel"]) and not np.any(u["stem_norm/norm/scale"])


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
