import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from linnaeus_jax import cli
from linnaeus_jax import config as config_lib

from conftest import ROOT, tiny_config


def _problems(config, **kw):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, **kw)
  return str(e.value)


def test_base_and_shipped_configs_validate(small_dataset):
  config_lib.validate(tiny_config(small_dataset[0]))
  for name, c in _shipped_configs():
    c.model.init.convnext = c.model.init.ropevit = ""  # finetune_sm: files to download
    config_lib.validate(c, need_data=False)
    config_lib.validate(config_lib.with_defaults(c), need_data=False)


def test_unknown_keys_all_reported_with_suggestions(small_dataset):
  c = tiny_config(small_dataset[0])
  with c.unlocked():
    c.train.epoch = 3
    c.data.h5.label_path = "x"
    c.model.classification.heads.taxa_L10.num_clases = 3
  msg = _problems(c)
  assert "unknown key train.epoch (did you mean train.epochs?)" in msg
  assert "unknown key data.h5.label_path (did you mean data.h5.labels_path?)" in msg
  assert "model.classification.heads.taxa_L10.num_clases" in msg


def test_inconsistent_values_all_reported(small_dataset):
  c = tiny_config(small_dataset[0])
  c.data.img_size = 48
  c.model.rope_stages.dims = [32, 64]
  c.data.task_keys_h5 = ["taxa_L20", "taxa_L10", "taxa_L30", "taxa_L40"]
  c.data.batch_size = 10
  c.lr_scheduler.warmup_fraction = 0.1  # tiny_config sets warmup_steps = 5
  c.model.rope_mode = "spin"
  c.logging.wandb.mode = "cloud"
  c.schedule.null_masking.enabled = True  # ramps 0 -> 1 with no end either
  msg = _problems(c, num_devices=4)
  for needle in ("multiple of 32", "must equal model.convnext_stages.dims[2:]",
                 "strictly ascending", "multiple of the 4 devices",
                 "lr_scheduler.warmup_steps=5 and lr_scheduler.warmup_fraction=0.1 are both set",
                 "schedule.null_masking ramps 0.0 -> 1.0 but has no end",
                 "model.rope_mode 'spin'", "logging.wandb.mode 'cloud' not in"):
    assert needle in msg, needle


def test_data_named_subtrees_accept_new_entries(small_dataset):
  c = tiny_config(small_dataset[0])
  c.data.meta.components.ALTITUDE = dict(enabled=False, source="alt", columns=[], dim=1, idx=5,
                                         allow_missing=True, oor_mask=False)
  config_lib.validate(c)
  c.data.meta.components.ALTITUDE.sorce = "x"
  assert "data.meta.components.ALTITUDE.sorce" in _problems(c)


def test_task_level_parses_fractional_ranks():
  assert config_lib.task_level("taxa_L33_5") == 33.5
  assert config_lib.task_level("taxa_L10") == 10.0


@pytest.mark.parametrize("steps,fraction,epochs,expected", [
    (7, 0.0, 0.0, 7),  # steps as given
    (0, 0.25, 0.0, 25),  # a fraction of the total steps
    (0, 0.0, 2.0, 20),  # epochs x steps per epoch
    (0, 0.001, 0.0, 1),  # at least one step once set
    (0, 0.0, 0.0, 0),  # unset
    (-3, -1.0, -2.0, 0),  # <= 0 is unset, negative too
])
def test_resolve_steps_takes_the_one_member_set(steps, fraction, epochs, expected):
  assert config_lib.resolve_steps(steps, fraction, epochs, total_steps=100,
                                  steps_per_epoch=10) == expected


def test_resolve_steps_refuses_two_members():
  with pytest.raises(config_lib.ConfigError,
                     match=r"steps=7 and fraction=0.5 are both set: set one \(0 unsets\)"):
    config_lib.resolve_steps(7, 0.5, 0.0, 100, 10)
  with pytest.raises(config_lib.ConfigError, match="steps=7, fraction=0.5 and epochs=2.0 are all"):
    config_lib.resolve_steps(7, 0.5, 2.0, 100, 10)


def test_total_steps_prefers_steps_over_epochs(small_dataset):
  c = tiny_config(small_dataset[0])
  c.train.steps, c.train.epochs = 0, 2.5
  assert config_lib.total_steps(c, steps_per_epoch=10) == 25
  c.train.steps = 7
  assert config_lib.total_steps(c, steps_per_epoch=10) == 7


def test_impossible_numbers_are_all_reported():
  c = tiny_config("/unused")
  config_lib.validate(c)
  c.train.steps = -5  # train.epochs stays 300: once silently trained for 300 epochs
  c.data.img_size, c.data.batch_size = 0, 0
  c.model.in_chans, c.model.drop_rate, c.model.label_smoothing = 0, 1.0, -0.1
  msg = _problems(c)
  for needle in ("train.steps must be >= 0 (0: train.epochs counts), got -5",
                 "data.img_size must be a positive multiple of 32", "got 0",
                 "data.batch_size must be an integer >= 1 or 'auto', got 0",
                 "model.in_chans must be >= 1, got 0", "model.drop_rate must be in [0, 1), got 1.0",
                 "model.label_smoothing must be in [0, 1), got -0.1"):
    assert needle in msg, needle
  c = tiny_config("/unused")
  c.data.batch_size, c.data.num_workers, c.data.prefetch_threads = "abc", -1, 2.5
  msg = _problems(c)
  for needle in ("data.batch_size must be an integer >= 1 or 'auto', got 'abc'",
                 "data.num_workers must be an integer >= 0 or 'auto', got -1",
                 "data.prefetch_threads must be an integer >= 0 or 'auto', got 2.5"):
    assert needle in msg, needle
  c = tiny_config("/unused")
  c.train.epochs = -2.0  # train.steps = 30 counts, but a negative epoch count is a typo
  assert "train.epochs must be >= 0 (0: unused; train.steps counts), got -2.0" in _problems(c)


def test_mix_null_task_keys_validate(small_dataset):
  c = tiny_config(small_dataset[0])
  c.schedule.mix.null_task_keys = ["taxa_L10"]
  config_lib.validate(c)  # a valid key: no error (it once shadowed another variable)
  c.schedule.mix.null_task_keys = ["taxa_L99"]
  with pytest.raises(config_lib.ConfigError, match="'taxa_L99' is not a task key"):
    config_lib.validate(c)


# ----------------------------------------------------------------------------- Command line

BASE_FILE = """from linnaeus_jax import config as config_lib


def get_config():
  return config_lib.{call}
"""
# Realistic values for sequences that are empty by default (any other gets one more entry).
EXAMPLES = {
    "schedule.meta_masking.partial.whitelist": (("TEMPORAL",), ("SPATIAL", "ELEVATION")),
    "schedule.validation.partial_mask_meta.whitelist": (("SPATIAL",), ("TEMPORAL", "SPATIAL")),
    "metrics.taxa_subsets": (("birds", "taxa_L40", 3),),
}


def _flag_values(tmp_path, argv_tail, call="base_config()"):
  """A fresh absl FlagValues with a config file flag over `call`, and the argv to parse."""
  path = tmp_path / "config_file.py"
  path.write_text(BASE_FILE.format(call=call))
  argv = ["prog", f"--config={path}", *argv_tail]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False,
                                  sys_argv=argv)
  return fv, argv


def _parse(tmp_path, *overrides, call="base_config()"):
  fv, argv = _flag_values(tmp_path, overrides, call)
  fv(argv)
  return fv["config"].value


def _sequences(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _sequences(value, f"{prefix}{key}.")
    elif isinstance(value, (list, tuple)):
      yield prefix + key, value


def _lists(value, path=""):
  """Paths of the lists anywhere in `value` (a to_dict() tree)."""
  if isinstance(value, dict):
    return [p for k, v in value.items() for p in _lists(v, f"{path}.{k}" if path else k)]
  if isinstance(value, tuple):
    return [p for i, v in enumerate(value) for p in _lists(v, f"{path}[{i}]")]
  return [path] if isinstance(value, list) else []


def _get(config, path):
  for key in path.split("."):
    config = config[key]
  return config


def test_every_sequence_key_is_settable_from_the_command_line(tmp_path):
  sequences = dict(_sequences(config_lib.base_config()))
  assert {"data.task_keys_h5", "model.rope_stages.dims", "optimizer.betas",
          "schedule.validation.partial_mask_meta.whitelist",
          "data.meta.components.TEMPORAL.columns"} <= set(sequences)
  changed = {k: EXAMPLES.get(k, tuple(reversed(v)) + tuple(v[:1]) if v else ("x",))
             for k, v in sequences.items()}
  config = _parse(tmp_path, *(f"--config.{k}={v!r}" for k, v in changed.items()))
  for key, value in changed.items():
    assert _get(config, key) == value, key
  # The README's example, as the shell passes it.
  config = _parse(tmp_path, "--config.data.task_keys_h5=('taxa_L10','taxa_L20')",
                  "--config.schedule.mix.group_levels=taxa_L20")
  assert config.data.task_keys_h5 == ("taxa_L10", "taxa_L20")
  assert config.schedule.mix.group_levels == ("taxa_L20",)


def test_base_config_validates_on_its_own():
  config_lib.validate(config_lib.base_config(), need_data=False)


VARIANTS = {"demo_ablation": ("full", "partial"), "mformer": ("sm", "md", "lg", "xl")}


def _shipped_configs():
  """(name, config) of every configs/*.py and variant ('demo_ablation:partial')."""
  import importlib.util
  import os
  for name in sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                     if f.endswith(".py")):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for variant in VARIANTS.get(name, (None,)):
      yield (f"{name}:{variant}" if variant else name), mod.get_config(*([variant] * bool(variant)))


def test_templates_and_shipped_configs_hold_tuples_not_lists():
  trees = {"base": config_lib.base_config().to_dict()}
  trees.update({k: f().to_dict() for k, f in config_lib.TEMPLATES.items()})
  trees.update({name: c.to_dict() for name, c in _shipped_configs()})
  for name, tree in trees.items():
    assert not _lists(tree), (name, _lists(tree))


def test_a_reloaded_config_json_has_tuples_and_stays_overridable(tmp_path):
  c = config_lib.base_config()
  c.data.task_keys_h5 = ("taxa_L10", "taxa_L20")
  c.model.classification.heads = {k: config_lib.head_template() for k in c.data.task_keys_h5}
  c.loss.task_specific.train.funcs = c.loss.task_specific.val.funcs = ("CrossEntropyLoss",) * 2
  c.schedule.mix.group_levels = ("taxa_L20",)
  c.schedule.validation.partial_mask_meta.whitelist = (("SPATIAL",),)
  again = config_lib.from_json(config_lib.to_json(c))
  assert again.to_dict() == config_lib.with_defaults(c).to_dict() and not _lists(again.to_dict())
  assert again.lr_scheduler.warmup_epochs == 5.0  # the default, recorded
  config_lib.validate(again, need_data=False)  # two heads: the four defaults do not come back
  (tmp_path / "config.json").write_text(config_lib.to_json(c))
  reloaded = _parse(tmp_path, "--config.schedule.validation.partial_mask_meta.whitelist="
                    "(('TEMPORAL','SPATIAL'),)", "--config.optimizer.betas=(0.9,0.95)",
                    call=f"read_json({str(tmp_path / 'config.json')!r})")
  assert reloaded.schedule.validation.partial_mask_meta.whitelist == (("TEMPORAL", "SPATIAL"),)
  assert reloaded.optimizer.betas == (0.9, 0.95)


@pytest.mark.parametrize("override,needles", [
    ("--config.data.batchsize=8", ["unknown key data.batchsize (did you mean data.batch_size?)"]),
    ("--config.model.classification.heads.taxa_L50.type=Linear",
     ["c.model.classification.heads.taxa_L50 = config_lib.head_template()", "configs/mformer.py"]),
    ("--config.data.meta.components.ALTITUDE.enabled=True",
     ["c.data.meta.components.ALTITUDE = config_lib.component_template()"]),
    ("--config.optimizer.parameter_groups.groups.heads.filter=all",
     ["c.optimizer.parameter_groups.groups.heads = config_lib.param_group_template()"]),
    ("--config.data.batch_size_val=abc", ["--config.data.batch_size_val=abc", "int"]),
])
def test_bad_overrides_stop_flag_parsing_with_one_line(tmp_path, capsys, override, needles):
  fv, argv = _flag_values(tmp_path, [override])
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, fv)
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
  for needle in needles:
    assert needle in err


def test_validating_a_config_imports_no_jax():
  code = ("import sys\n"
          "from linnaeus_jax import config\n"
          "c = config.base_config()\n"
          "c.optimizer.parameter_groups.enabled = True\n"
          "c.optimizer.parameter_groups.groups.heads = config.param_group_template(\n"
          "    filter='startswith:head/ or (ndim:2 and not contains:meta_)')\n"
          "c.optimizer.parameter_groups.order = ('heads',)\n"
          "c.aug.autoaug.policy = 'rand-m9-n2'\n"
          "config.validate(c, need_data=False)\n"
          "c.optimizer.parameter_groups.groups.heads.filter = 'ndim:2 and ('\n"
          "try:\n"
          "  config.validate(c, need_data=False)\n"
          "except config.ConfigError as e:\n"
          "  assert 'groups.heads.filter' in str(e), e\n"
          "else:\n"
          "  raise AssertionError('a bad filter passed')\n"
          "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax',\n"
          "    'optax') or m in ('linnaeus_jax.optim', 'linnaeus_jax.data.augment'))\n"
          "assert not loaded, loaded\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- Durations

TOTAL, SPE = 1000, 40
# Every duration of base_config() in steps at TOTAL, SPE, computed by the code before the
# one-member rule and checked by hand: warmup 5 epochs, full masking ends at 30% and the partial
# probability at 50% of training, validations and checkpoints every epoch, the rest unset.
BASE_STEPS = {
    "lr_scheduler.warmup": 200, "schedule.meta_masking.end": 300,
    "schedule.meta_masking.partial.start": 0, "schedule.meta_masking.partial.end": 0,
    "schedule.meta_masking.partial.prob_end": 500, "schedule.null_masking.end": 0,
    "schedule.mix.prob.end": 0, "schedule.validation.interval": 40,
    "schedule.validation.mask_meta_interval": 40,
    "schedule.validation.partial_mask_meta.interval": 40, "schedule.checkpoint.interval": 40}
# demo.py: warmup_steps 25, masking ends at 50%, validations and checkpoints every 100 steps.
_DEMO = {"lr_scheduler.warmup": 25, "schedule.meta_masking.end": 500,
         "schedule.validation.interval": 100, "schedule.validation.mask_meta_interval": 100,
         "schedule.checkpoint.interval": 100}
# sm.py: partial masking in [10%, 90%), null masking ends at 20%, mixing at 80%.
_SM = {"schedule.meta_masking.partial.start": 100, "schedule.meta_masking.partial.end": 900,
       "schedule.null_masking.end": 200, "schedule.mix.prob.end": 800}
# Each shipped config's differences from BASE_STEPS, as before (same method). md, lg and xl had
# none: they now are sm's recipe at their size.
CONFIG_STEPS = {
    "demo": _DEMO,
    "demo_ablation:full": {**_DEMO, "schedule.validation.partial_mask_meta.interval": 250},
    "demo_ablation:partial": {**_DEMO, "schedule.validation.partial_mask_meta.interval": 250,
                              "schedule.meta_masking.partial.end": 1000},
    "demo_finetune": {**_DEMO, "schedule.validation.interval": 50},
    "demo_hard": {**_DEMO, "schedule.validation.partial_mask_meta.interval": 250},
    "finetune_sm": {**_SM, "lr_scheduler.warmup": 40, "schedule.meta_masking.end": 200},
    "inat21": {**_SM, "schedule.validation.mask_meta_interval": 80},
    **{name: _SM for name in ("sm", "md", "lg", "xl", "mformer:sm", "mformer:md", "mformer:lg",
                              "mformer:xl")},
}


def _members_steps(config, name):
  """`name` resolved the way train.py does: resolve_steps of its members."""
  parent, prefix = name.rsplit(".", 1)
  node = _get(config, parent)
  values = [node.get(f"{prefix}_{u}", 0) for u in config_lib.UNITS]
  return config_lib.resolve_steps(*values, total_steps=TOTAL, steps_per_epoch=SPE)


def test_every_duration_of_every_shipped_config_resolves_as_before():
  configs = {"base": config_lib.base_config(), **dict(_shipped_configs())}
  assert set(configs) == {"base", *CONFIG_STEPS}
  for name, c in configs.items():
    want = {**BASE_STEPS, **CONFIG_STEPS.get(name, {})}
    assert {d: config_lib.resolve_duration(c, d, TOTAL, SPE)
            for d in config_lib.DURATIONS} == want, name
    # with_defaults writes each default member, so that the members alone resolve the same.
    loaded = config_lib.with_defaults(c)
    assert {d: _members_steps(loaded, d) for d in config_lib.DURATIONS} == want, name


def test_the_durations_table_names_every_group_and_base_config_sets_none():
  flat = config_lib.base_config().to_dict()
  keys = [p for p in _flat(flat) if re.search(r"_(steps|fraction|epochs)$", p)]
  groups = {}
  for key in keys:
    groups.setdefault(key.rsplit("_", 1)[0], []).append(key.rsplit("_", 1)[1])
  # Keys alone in their group are counts, not durations (train.steps, lr_scheduler.decay_steps).
  assert {g: set(u) for g, u in groups.items() if len(u) > 1} == {
      name: set(d.units) for name, d in config_lib.DURATIONS.items()}
  base = config_lib.base_config()
  for name, d in config_lib.DURATIONS.items():
    assert config_lib.duration(base, name) == d.default, name
    assert d.default is None or d.default[0] in d.units, name
    assert all(_get(base, f"{name}_{u}") == 0 for u in d.units), name


def test_a_duration_takes_one_member_and_zero_unsets():
  c = config_lib.base_config()
  v = c.schedule.validation
  v.interval_steps, v.interval_epochs = 100, 1.0
  assert ("schedule.validation.interval_steps=100 and schedule.validation.interval_epochs=1.0 "
          "are both set: set one (0 unsets)") in _problems(c, need_data=False)
  with pytest.raises(config_lib.ConfigError, match="interval_steps=100 and"):
    config_lib.resolve_duration(c, "schedule.validation.interval", TOTAL, SPE)
  v.interval_epochs = 0.0
  assert config_lib.resolve_duration(c, "schedule.validation.interval", TOTAL, SPE) == 100
  v.interval_steps = 0  # none set: the default, every epoch
  assert config_lib.resolve_duration(c, "schedule.validation.interval", TOTAL, SPE) == SPE
  v.interval_fraction = 1.0  # only at the end of training
  assert config_lib.resolve_duration(c, "schedule.validation.interval", TOTAL, SPE) == TOTAL
  v.interval_fraction = 0.0  # a zero fraction is unset (it once meant every step)
  assert config_lib.resolve_duration(c, "schedule.validation.interval", TOTAL, SPE) == SPE
  pm = c.schedule.meta_masking.partial
  pm.enabled, pm.whitelist = True, (("SPATIAL",),)
  assert "partial is enabled but has no end" in _problems(c, need_data=False)
  pm.end_fraction = 0.5
  config_lib.validate(c, need_data=False)


def test_with_defaults_records_the_defaults_and_keeps_the_member_set():
  c = config_lib.base_config()
  c.lr_scheduler.warmup_steps = 25
  loaded = config_lib.with_defaults(c)
  s = loaded.lr_scheduler
  assert (s.warmup_steps, s.warmup_fraction, s.warmup_epochs) == (25, 0.0, 0.0)
  v = loaded.schedule.validation
  assert (v.interval_steps, v.interval_fraction, v.interval_epochs) == (0, 0.0, 1.0)
  assert loaded.schedule.meta_masking.end_fraction == 0.3
  assert loaded.schedule.null_masking.end_fraction == 0.0  # no default: stays unset
  assert config_lib.with_defaults(loaded).to_dict() == loaded.to_dict()


def test_an_old_config_json_keeps_the_member_that_counted():
  """Written before the one-member rule: the default member and the one a config file set are
  both there (demo.py's warmup_steps 25 over warmup_epochs 5)."""
  c = config_lib.with_defaults(config_lib.base_config()).to_dict()
  c["lr_scheduler"].update(warmup_steps=25, warmup_fraction=-1.0, warmup_epochs=5.0)
  c["schedule"]["validation"].update(interval_steps=0, interval_fraction=0.5, interval_epochs=1.0)
  again = config_lib.from_json(json.dumps(c))
  config_lib.validate(again, need_data=False)
  assert config_lib.duration(again, "lr_scheduler.warmup") == ("steps", 25)
  assert config_lib.duration(again, "schedule.validation.interval") == ("fraction", 0.5)


# ----------------------------------------------------------------------------- Rule tables


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _outside(interval, value):
  """A value of `value`'s type outside `interval`."""
  left, low, _, _ = re.fullmatch(r"([\[(])(-?[\d.]+), (\S+)([\])])", interval).groups()
  bad = float(low) - 1 if left == "[" else float(low)
  return type(value)(bad)


def test_rule_tables_name_existing_keys_and_hold_the_defaults():
  base = config_lib.base_config()
  for pattern in [*config_lib.CHOICES, *config_lib.RANGES]:
    assert config_lib.matches(base, pattern.removesuffix("[]")), pattern
  for pattern, spec in config_lib.RANGES.items():
    interval = spec if isinstance(spec, str) else spec[0]
    for key, value in config_lib.matches(base, pattern):
      assert config_lib.range_problem(key, value, interval) is None, key


def test_every_table_rule_is_reported_at_once():
  c = config_lib.base_config()
  for pattern in config_lib.CHOICES:
    for key, value in config_lib.matches(c, pattern.removesuffix("[]")):
      parent, name = key.rsplit(".", 1)
      _get(c, parent)[name] = ("bogus",) * len(value) if pattern.endswith("[]") else "bogus"
  for pattern, spec in config_lib.RANGES.items():
    for key, value in config_lib.matches(c, pattern):
      parent, name = key.rsplit(".", 1)
      _get(c, parent)[name] = _outside(spec if isinstance(spec, str) else spec[0], value)
  msg = _problems(c, need_data=False)
  for pattern in config_lib.CHOICES:
    for key, _ in config_lib.matches(c, pattern.removesuffix("[]")):
      assert f"{key}{':' * pattern.endswith('[]')} 'bogus' not in (" in msg, key
  for pattern in config_lib.RANGES:
    for key, _ in config_lib.matches(c, pattern):
      assert f"\n  {key} must be " in msg, key
  assert "model.classification.heads.taxa_L10.temperature must be > 0, got 0.0" in msg
  assert "train.resume_step must be >= -1 (a checkpoint step, or -1: the latest), got -2" in msg


# ----------------------------------------------------------------------------- Sizes

SIZE_KEYS = {"model.convnext_stages.dims", "model.rope_stages.depths", "model.rope_stages.dims",
             "model.rope_stages.num_heads", "model.drop_path_rate"}
# configs/sm.py's differences from base_config() before sm became a variant of mformer.py,
# durations left out (their resolved values: CONFIG_STEPS).
SM_RECIPE = {
    "data.meta.components.ELEVATION.enabled": True, "data.partial.levels": True,
    "loss.grad_weighting.task.type": "gradnorm",
    "loss.task_specific.train.funcs": ("TaxonomyAwareLabelSmoothing",
                                       "LabelSmoothingCrossEntropy", "CrossEntropyLoss",
                                       "CrossEntropyLoss"),
    "loss.taxonomy_smoothing.enabled": (True, False, False, False),
    "schedule.meta_masking.end_prob": 0.05, "schedule.meta_masking.partial.enabled": True,
    "schedule.meta_masking.partial.weights": (1.0, 1.0, 1.0, 0.5, 0.5, 0.5),
    "schedule.meta_masking.partial.whitelist": (
        ("TEMPORAL",), ("SPATIAL",), ("ELEVATION",), ("TEMPORAL", "SPATIAL"),
        ("TEMPORAL", "ELEVATION"), ("SPATIAL", "ELEVATION")),
    "schedule.mix.cutmix.enabled": True, "schedule.mix.cutmix.minmax": (0.3, 0.7),
    "schedule.mix.exclude_null_samples": True, "schedule.mix.group_levels": ("taxa_L20",),
    "schedule.mix.prob.enabled": True, "schedule.mix.prob.end_prob": 0.1,
    "schedule.mix.prob.start_prob": 0.5, "schedule.null_masking.enabled": True}
# The same for the files built on sm.py, as differences from sm.py.
ON_SM = {
    "inat21": {
        "data.batch_size": 256, "data.batch_size_val": 512, "data.hybrid.use_hybrid": True,
        "data.meta.components.ELEVATION.enabled": False,
        "data.meta.components.TEMPORAL.dim": 4, "data.num_workers": 8,
        "lr_scheduler.scale_by_batch": True,
        "schedule.meta_masking.partial.weights": (1.0, 1.0, 0.5),
        "schedule.meta_masking.partial.whitelist": (("TEMPORAL",), ("SPATIAL",),
                                                    ("TEMPORAL", "SPATIAL")),
        "train.epochs": 30.0},
    "finetune_sm": {
        "data.img_size": 224, "lr_scheduler.base_lr": 2e-4, "model.drop_path_rate": 0.1,
        "model.init.convnext": "pretrained/convnext_tiny_1k_224_ema.pth",
        "model.init.ropevit": "pretrained/rope_mixed_deit_small_patch16_LS.bin",
        "model.rope_stages.norm_eps": 1e-6,
        "optimizer.freeze": "startswith:stem_ or startswith:stage0/", "optimizer.layer_decay": 0.8,
        "schedule.meta_masking.start_prob": 0.5, "train.epochs": 30.0},
}


def _recipe(config, reference):
  """`config`'s differences from `reference`, durations left out."""
  a, b = _flat(reference.to_dict()), _flat(config.to_dict())
  return {k: v for k, v in b.items()
          if a.get(k) != v and not re.search(r"_(steps|fraction|epochs)$", k)}


def test_sm_and_the_configs_built_on_it_are_unchanged():
  configs = dict(_shipped_configs())
  sm = configs["sm"]
  assert _recipe(sm, config_lib.base_config()) == SM_RECIPE
  assert config_lib.to_json(sm) == config_lib.to_json(configs["mformer:sm"])
  for name, diff in ON_SM.items():
    assert _recipe(configs[name], sm) == diff, name


def test_sizes_are_variants_of_one_recipe():
  configs = dict(_shipped_configs())
  sm = configs["sm"]
  for size, spec in config_lib.MFORMER_V1_SIZES.items():
    c = configs[size]
    assert config_lib.to_json(c) == config_lib.to_json(configs[f"mformer:{size}"]), size
    assert set(_flat(c.to_dict())) == set(_flat(sm.to_dict())), size
    assert set(_recipe(c, sm)) <= SIZE_KEYS, size  # durations: CONFIG_STEPS
    assert c.model.drop_path_rate == spec["drop_path"]
    assert c.loss.grad_weighting.task.type == "gradnorm", size
    for key in ("meta_masking", "null_masking", "mix"):
      assert c.schedule[key].to_dict() == sm.schedule[key].to_dict(), (size, key)
  assert set(_recipe(configs["md"], sm)) == {"model.rope_stages.depths", "model.drop_path_rate"}
  md = cli._load_config_file(os.path.join(ROOT, "configs", "mformer.py:md"))
  assert config_lib.to_json(md) == config_lib.to_json(configs["md"])
  with pytest.raises(ValueError, match="variant 'xxl': one of sm, md, lg, xl"):
    cli._load_config_file(os.path.join(ROOT, "configs", "mformer.py:xxl"))
