"""tools/import_config: original YAML (with BASE includes) -> our config, report and .py file."""

import logging
import os
import runpy
import subprocess
import sys
import textwrap

import pytest

from linnaeus_jax import config as config_lib
from linnaeus_jax.tools import import_config

from conftest import ROOT

ARCH = """
MODEL:
  TYPE: "mFormerV1"
  NAME: "tiny"
  DROP_PATH_RATE: 0.3
  LABEL_SMOOTHING: 0.2
  EXTRA_TOKEN_NUM: 4
  CONVNEXT_STAGES:
    DEPTHS: [2, 2, 6, 2]
    DIMS: [32, 64, 128, 256]
  ROPE_STAGES:
    DEPTHS: [3, 1]
    DIMS: [128, 256]
    NUM_HEADS: [2, 4]
    MLP_RATIO: [3, 3]
  AGGREGATION: {TYPE: "Conv1d"}
  CLASSIFICATION:
    HEADS: {}
"""

COMMON = """
TRAIN: {EPOCHS: 10, CLIP_GRAD: 1.0}
DATA: {BATCH_SIZE: 8, IMG_SIZE: 224}
"""

EXPERIMENT = """
BASE: ['configs/common.yaml']
MODEL:
  BASE: ['configs/model/archs/tiny.yaml']
  DROP_PATH_RATE: 0.05
  CONVNEXT_STAGES: {DIMS: [48, 96, 192, 384]}
  ROPE_STAGES: {DIMS: [192, 384], NUM_HEADS: [3, 6]}
  CLASSIFICATION:
    HEADS:
      taxa_L10: {TYPE: 'ConditionalClassifier', ROUTING_STRATEGY: 'hard', TEMPERATURE: 2,
                 USE_BIAS: True}
      taxa_L20: {TYPE: 'Linear'}
DATA:
  TASK_KEYS_H5: ['taxa_L10', 'taxa_L20']
  IMG_SIZE: 256
  META:
    COMPONENTS:
      HABITAT: {ENABLED: True, SOURCE: 'habitat', DIM: 4, IDX: 3}
      ELEVATION: {ENABLED: True}
      WEATHER: {COLOUR: 'grey'}
TRAIN: {ACCUMULATION_STEPS: 2, EPOCHS: 20}
LR_SCHEDULER: {BASE_LR: 5e-4, WARMUP_FRACTION: None}
LOSS:
  TASK_SPECIFIC:
    TRAIN: {FUNCS: ['CrossEntropyLoss', 'CrossEntropyLoss']}
    VAL: {FUNCS: ['CrossEntropyLoss', 'CrossEntropyLoss']}
  GRAD_WEIGHTING: {TASK: {TYPE: 'gradnorm', GRADNORM_ENABLED: False}}
SCHEDULE: {META_MASKING: {END_STEPS: 100}}
MY_SECTION: {FOO: 3}
"""


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(textwrap.dedent(text))
  return str(path)


@pytest.fixture
def repo(tmp_path):
  """A tree shaped like the original's: configs/{common,model/archs/tiny,experiments/exp}.yaml."""
  root = tmp_path / "orig"
  _write(root / "configs/model/archs/tiny.yaml", ARCH)
  _write(root / "configs/common.yaml", COMMON)
  return str(root), _write(root / "configs/experiments/exp.yaml", EXPERIMENT)


def _keys(entries):
  return {e["key"]: e["value"] for e in entries}


def test_precedence_defaults_arch_experiment(repo):
  root, exp = repo
  c, report = import_config.from_yaml(exp, config_dir=root)
  m = c.model
  assert m.drop_path_rate == 0.05  # experiment 0.05 > arch 0.3 > default 0.2
  assert m.label_smoothing == 0.2  # arch 0.2 > default 0.1
  assert m.rope_stages.rope_theta == 10000.0  # default only
  assert list(m.convnext_stages.dims) == [48, 96, 192, 384]  # experiment, merged recursively:
  assert list(m.convnext_stages.depths) == [2, 2]  # the arch's depths [:2] stay
  assert list(m.rope_stages.depths) == [3, 1] and list(m.rope_stages.num_heads) == [3, 6]
  assert list(m.rope_stages.mlp_ratio) == [3.0, 3.0]  # YAML ints coerced to our floats
  assert m.name == "mFormerV1"
  # Top-level BASE: underneath the file itself.
  assert c.data.img_size == 256 and c.train.clip_grad == 1.0 and c.train.epochs == 20.0
  assert c.data.batch_size == 16 and c.train.accumulation_steps == 2  # 8 per GPU x 2 micro-batches
  assert c.lr_scheduler.base_lr == 5e-4  # the string '5e-4' decoded as YACS does
  assert c.lr_scheduler.warmup_fraction == 0.0  # None = unset
  assert c.loss.grad_weighting.task.type == "static"  # gradnorm with GRADNORM_ENABLED False
  assert report["includes"] == [os.path.join(root, "configs/common.yaml"),
                                os.path.join(root, "configs/model/archs/tiny.yaml")]
  mapped = {e["key"]: e["to"] for e in report["mapped"]}
  assert mapped["MODEL.TYPE"] == "model.name"
  assert mapped["DATA.META.COMPONENTS.HABITAT.DIM"] == "data.meta.components.HABITAT.dim"
  # Without config_dir the includes are found from the YAML's ancestor folders.
  c2, _ = import_config.from_yaml(exp)
  assert c2.to_dict() == c.to_dict()


def test_heads_and_components_from_templates(repo):
  c, _ = import_config.from_yaml(repo[1], config_dir=repo[0])
  heads = c.model.classification.heads
  assert sorted(heads.keys()) == ["taxa_L10", "taxa_L20"]  # exactly the declared heads
  assert heads.taxa_L10.to_dict() == dict(type="ConditionalClassifier", num_classes=0,
                                          routing_strategy="hard", temperature=2.0)
  assert heads.taxa_L20.to_dict() == config_lib.head_template(
      ).to_dict() | {"type": "Linear"}
  comps = c.data.meta.components
  assert comps.HABITAT.to_dict() == config_lib.component_template().to_dict() | dict(
      enabled=True, source="habitat", dim=4, idx=3)
  assert comps.ELEVATION.enabled and comps.TEMPORAL.enabled  # defaults kept


def test_dead_keys_ignored_with_one_warning_and_unknown_keys_unmapped(repo, caplog):
  with caplog.at_level(logging.WARNING):
    c, report = import_config.from_yaml(repo[1], config_dir=repo[0])
  ignored = _keys(report["ignored"])
  assert ignored == {"MODEL.EXTRA_TOKEN_NUM": 4, "MODEL.AGGREGATION.TYPE": "Conv1d",
                     "MODEL.CONVNEXT_STAGES.DEPTHS[2:]": [6, 2]}
  warnings = [r for r in caplog.records if "ignored keys" in r.getMessage()]
  assert len(warnings) == 1 and "MODEL.AGGREGATION.TYPE" in warnings[0].getMessage()
  unmapped = _keys(report["unmapped"])
  assert unmapped == {"MY_SECTION.FOO": 3, "MODEL.NAME": "tiny",
                      "MODEL.CLASSIFICATION.HEADS.taxa_L10.USE_BIAS": True,
                      "DATA.META.COMPONENTS.WEATHER.COLOUR": "grey"}
  assert "WEATHER" not in c.data.meta.components  # no entry made for an unknown key
  # Validation problems are collected, not raised: the default mix level is not a task here.
  assert any("schedule.mix.group_levels" in p for p in report["problems"])
  assert "my_section" not in c


def test_missing_include_names_it_and_where_it_looked(tmp_path):
  exp = _write(tmp_path / "configs/exp.yaml", "MODEL: {BASE: ['configs/nope.yaml']}\n")
  with pytest.raises(config_lib.ConfigError, match=r"include 'configs/nope.yaml'.*looked in") as e:
    import_config.from_yaml(exp, config_dir=str(tmp_path))
  assert os.path.join(str(tmp_path), "configs/nope.yaml") in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="folder and its ancestors"):
    import_config.from_yaml(exp)
  with pytest.raises(config_lib.ConfigError, match="not found"):
    import_config.from_yaml(str(tmp_path / "absent.yaml"))


def test_written_file_loads_back_equal(repo, tmp_path):
  c, report = import_config.from_yaml(repo[1], config_dir=repo[0])
  text = import_config.to_python(c, report)
  out = _write(tmp_path / "out/x.py", text)
  loaded = runpy.run_path(out)["get_config"]()
  assert loaded.to_dict() == c.to_dict()
  assert all(len(line) <= import_config.WIDTH for line in text.splitlines()
             if str(tmp_path) not in line)  # the source and include paths are not cut
  assert f"from\n#   {repo[1]}\n# with the includes\n#   {repo[0]}/configs/common.yaml" in text
  assert "#   MY_SECTION.FOO = 3" in text
  assert "#   MODEL.EXTRA_TOKEN_NUM = 4" in text
  assert "  c.model.drop_path_rate = 0.05\n" in text
  assert "del c.model.classification.heads['taxa_L30']" in text
  assert "  c.data.meta.components.HABITAT = config_lib.component_template()\n" in text
  assert "rope_theta" not in text  # equal to our default: not repeated


def test_cli_summary_and_exit_codes(repo, tmp_path):
  out = str(tmp_path / "x.py")
  cmd = [sys.executable, "-m", "linnaeus_jax.tools.import_config"]
  r = subprocess.run(cmd + [f"--yaml={repo[1]}", f"--out={out}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  n = len(import_config.from_yaml(repo[1])[1]["mapped"])
  assert f"{n} mapped" in r.stdout and "3 ignored" in r.stdout
  assert "MODEL.EXTRA_TOKEN_NUM" in r.stdout and "MY_SECTION.FOO = 3" in r.stdout
  assert os.path.isfile(out)
  bad = _write(tmp_path / "bad.yaml", "MODEL: [unclosed\n")
  for yaml_path in (str(tmp_path / "absent.yaml"), bad):
    r = subprocess.run(cmd + [f"--yaml={yaml_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr
