"""One run per workdir: an exclusive lock on DIR/run.lock for the run's lifetime.

The lock is an `flock` on the file (released by the kernel however the process ends, kill -9
included); the file names the holder (host, pid, start time) for the error a second run gets. A
file left by a run that did not exit cleanly is taken over with a warning. Where the filesystem
has no `flock`, the recorded pid decides: alive on this host means held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

NAME = "run.lock"


class WorkdirLockedError(OSError):
  """Another run holds the workdir."""


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError):
    return False
  except PermissionError:
    return True  # another user's live process
  return True


def _read(fd) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (ValueError, UnicodeDecodeError):
    return {}


class Lock:
  """Holds DIR/run.lock from construction to `release()` (also a context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, NAME)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      flocked = True
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):  # no flock here: the pid decides
        flocked = False
      else:
        holder = _read(self.fd)
        os.close(self.fd)
        raise WorkdirLockedError(
            f"{workdir} is in use by another run ({_describe(holder)}; lock {self.path}): wait "
            "for it to finish or use another --workdir") from e
    previous = _read(self.fd)
    if previous:
      same_host = previous.get("host") == socket.gethostname()
      if not flocked and (not same_host or _alive(previous.get("pid"))):
        os.close(self.fd)
        raise WorkdirLockedError(
            f"{workdir} is in use by another run ({_describe(previous)}; lock {self.path}, "
            "this filesystem has no flock): if that run is dead, delete the lock file")
      logging.warning("taking over %s left by a run that did not exit cleanly (%s)", self.path,
                      _describe(previous))
    os.ftruncate(self.fd, 0)
    os.lseek(self.fd, 0, os.SEEK_SET)
    os.write(self.fd, json.dumps(_holder()).encode())
    os.fsync(self.fd)

  def release(self) -> None:
    if self.fd is None:
      return
    os.ftruncate(self.fd, 0)  # an empty file: released cleanly
    os.close(self.fd)  # closing drops the flock
    self.fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(workdir: str):
  """The workdir's lock, taken by process 0 (a context manager on every process); every
  process raises WorkdirLockedError together if another run holds it."""
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = Lock(workdir)
    except WorkdirLockedError as e:
      error = str(e)
  if jax.process_count() > 1:
    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
      error = f"{workdir} is in use by another run (process 0 holds the error)"
  if error:
    raise WorkdirLockedError(error)
  return lock or contextlib.nullcontext()
