"""The commands' shared flag handling (`cli.parse_flags`): a stray argument is one error line."""

import subprocess
import sys

import pytest
from absl import flags

from linnaeus_jax import cli

from conftest import ROOT

STRAY = "error: unexpected argument(s) {}: options are --name=value (--help lists them)"


def test_positional_arguments_are_refused_in_one_line(capsys):
  fv = flags.FlagValues()
  flags.DEFINE_string("name", None, "a flag", flag_values=fv)
  assert cli.parse_flags(["prog", "--name=x"], fv) == ["prog"]
  assert fv.name == "x"
  for argv, stray in ((["prog", "--name=x", "stray"], "stray"),
                      (["prog", "one", "--name=y", "two"], "one two")):  # flags in between
    with pytest.raises(SystemExit) as e:
      cli.parse_flags(argv, fv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == STRAY.format(stray) + "\n", err
  assert fv.name == "y"  # the flags were parsed first


@pytest.mark.parametrize("module,extra", [("linnaeus_jax.main", ["--config=configs/demo.py"]),
                                          ("linnaeus_jax.evaluate", [])])
def test_a_stray_argument_to_a_command_is_one_error_line_and_creates_nothing(tmp_path, module,
                                                                             extra):
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", module, *extra, f"--workdir={workdir}", "stray"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.splitlines() == [STRAY.format("stray")], r.stderr[-3000:]
  assert r.stdout == "" and not workdir.exists()
