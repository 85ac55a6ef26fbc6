"""What every command's `main` shares: no stray arguments, quiet library logs, clear errors.

Bad input (a config, a file, a checkpoint) is reported as one `error: ...` line on stderr with
exit code 1, not a traceback; `ValueError` covers ConfigError, BundleError, ConversionError and
the other input errors, `OSError` missing, existing or unreadable files.
"""

from __future__ import annotations

import sys

from absl import app, logging

INPUT_ERRORS = (ValueError, OSError)


def start(argv, verbosity=logging.WARNING) -> None:
  """Refuses positional arguments; Orbax and Grain log every step at INFO through absl."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(verbosity)


def call(fn, *args, errors=INPUT_ERRORS, **kwargs):
  """fn(*args, **kwargs), or `error: <message>` on stderr and exit 1 on one of `errors`."""
  try:
    return fn(*args, **kwargs)
  except errors as e:
    newline = "\n" if sys.stderr.isatty() else ""  # past a progress line redrawn in place
    print(f"{newline}error: {e}", file=sys.stderr)
    sys.exit(1)
