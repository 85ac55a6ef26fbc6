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
  import importlib.util, os
  for name in ("demo", "sm"):
    spec = importlib.util.spec_from_file_location(name, os.path.join("configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if name == "sm":
      c.data.h5.labels_path = "/data/labels.h5"
    config_lib.validate(c)


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
  c.schedule.meta_masking.end_fraction = -1.0
  c.model.rope_mode = "spin"
  c.logging.wandb.mode = "cloud"
  c.schedule.null_masking.enabled = True  # ramps 0 -> 1 with no end either
  msg = _problems(c, num_devices=4)
  for needle in ("multiple of 32", "must equal model.convnext_stages.dims[2:]",
                 "strictly ascending", "multiple of the 4 devices",
                 "schedule.meta_masking ramps 0.5 -> 0.0 but has no end",
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
    (7, 0.5, 2.0, 7),  # explicit steps win
    (0, 0.25, 2.0, 25),  # then the fraction of total steps
    (0, -1.0, 2.0, 20),  # then epochs x steps per epoch
    (0, -1.0, 0.0, 0),  # unset
    (0, 0.0, 0.0, 1),  # a zero fraction still fires once
])
def test_resolve_steps_precedence(steps, fraction, epochs, expected):
  assert config_lib.resolve_steps(steps, fraction, epochs, total_steps=100,
                                  steps_per_epoch=10) == expected


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


def _shipped_configs():
  import importlib.util
  import os
  for name in sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                     if f.endswith(".py")):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for variant in (("full", "partial") if name == "demo_ablation" else (None,)):
      yield name, mod.get_config(*([variant] if variant else []))


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
  assert again.to_dict() == c.to_dict() and not _lists(again.to_dict())
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
     ["c.model.classification.heads.taxa_L50 = config_lib.head_template()", "configs/sm.py"]),
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
