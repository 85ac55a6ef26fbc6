import pytest

from linnaeus_jax import config as config_lib

from conftest import tiny_config


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
  msg = _problems(c, num_devices=4)
  for needle in ("multiple of 32", "must equal model.convnext_stages.dims[2:]",
                 "strictly ascending", "multiple of the 4 devices", "has no end",
                 "model.rope_mode 'spin'"):
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


def test_mix_null_task_keys_validate(small_dataset):
  c = tiny_config(small_dataset[0])
  c.schedule.mix.null_task_keys = ["taxa_L10"]
  config_lib.validate(c)  # a valid key: no error (it once shadowed another variable)
  c.schedule.mix.null_task_keys = ["taxa_L99"]
  with pytest.raises(config_lib.ConfigError, match="'taxa_L99' is not a task key"):
    config_lib.validate(c)
