"""What every command shares: flag parsing, no stray arguments, quiet library logs, clear errors.

Bad input (a flag, a config file or override, a file, a checkpoint) is reported as one
`error: ...` line on stderr with exit code 1, not a traceback; `ValueError` covers ConfigError,
BundleError, ConversionError and the other input errors, `OSError` missing, existing or
unreadable files. Commands start with `cli.run(main)` instead of `app.run(main)`, so that a
misspelled or mistyped `--config.x=v`, or a config file that is missing or fails, stops the
command during flag parsing, before it creates anything.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from linnaeus_jax import config as config_lib

INPUT_ERRORS = (ValueError, OSError)


def start(argv, verbosity=logging.WARNING) -> None:
  """Quiets library logs (Orbax and Grain log every step at INFO through absl); positional
  arguments were refused by `parse_flags`."""
  del argv
  logging.set_verbosity(verbosity)


def call(fn, *args, errors=INPUT_ERRORS, **kwargs):
  """fn(*args, **kwargs), or `error: <message>` on stderr and exit 1 on one of `errors`."""
  try:
    return fn(*args, **kwargs)
  except errors as e:
    fail(e)


def fail(message) -> NoReturn:
  """`error: <message>` on one line of stderr (a list of problems joined by '; '), exit 1."""
  newline = "\n" if sys.stderr.isatty() else ""  # past a progress line redrawn in place
  print(f"{newline}error: {one_line(message)}", file=sys.stderr)
  sys.exit(1)


def run(main) -> None:
  """app.run(main), with bad flags and config files reported by `parse_flags`."""
  app.run(main, flags_parser=parse_flags)


def one_line(message) -> str:
  """`message` on one line: its lines joined with '; ' (with ' ' after a line ending in ':')."""
  out = ""
  for line in filter(None, (ln.strip() for ln in str(message).splitlines())):
    out += ("" if not out else " " if out.endswith(":") else "; ") + line
  return out


def parse_flags(argv, flag_values=flags.FLAGS) -> list[str]:
  """Parses argv into `flag_values`; on a bad flag, config file or override: `fail` with one
  line that names it (an unknown key with the closest known one)."""
  try:
    rest = flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except  # a config file runs arbitrary code
    fail(_config_problem(argv, flag_values) or one_line(e))
  for name in _config_flags(flag_values):
    flag = flag_values[name]
    if flag.present and not isinstance(flag.value, ml_collections.ConfigDict):
      # config_flags defers a file that fails to load (OSError) until the config is used.
      fail(_config_problem(argv, flag_values) or f"--{name}: no config")
  if len(rest) > 1:  # one line, not absl's usage text
    fail(f"unexpected argument(s) {' '.join(rest[1:])}: options are --name=value "
         f"(--help lists them)")
  return rest


def _load_config_file(arg: str) -> ml_collections.ConfigDict:
  """`get_config()` of a `--config` argument `path[:parameter]`; ValueError in one line."""
  path, *parameter = arg.split(":", 1)
  if not os.path.isfile(path):
    raise ValueError("no such file")
  try:
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{type(e).__name__}: {one_line(e)}") from e
  try:
    config = module.get_config(*parameter)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"get_config() raised {type(e).__name__}: {one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
  return config


def _config_flags(flag_values) -> list[str]:
  """The names of the config file flags (config_flags.DEFINE_config_file)."""
  return [n for n in flag_values
          if isinstance(flag_values[n].parser, config_flags.ConfigFileFlagParser)]


def _config_problem(argv, flag_values) -> str | None:
  """What is wrong with a config flag's file or overrides in argv (None if nothing)."""
  for name in _config_flags(flag_values):
    files = [v for a, v in zip(argv, list(argv[1:]) + [""]) if a == f"--{name}"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    overrides = [m[1] for a in argv if (m := re.match(rf"--(?:no)?{name}\.([^=]+)", a))]
    if not files:
      if overrides:
        return f"--{name}.{overrides[0]}: overrides need a config file (--{name}=FILE)"
      continue
    try:
      config = _load_config_file(files[-1])
    except ValueError as e:
      return f"--{name}={files[-1]}: {e}"
    for path in overrides:
      if (problem := config_lib.override_problem(config, path)):
        return f"--{name}.{path}: {problem}"
  return None
