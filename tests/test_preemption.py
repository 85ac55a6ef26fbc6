import os
import signal

from linnaeus_jax import preemption


def test_sigterm_is_caught_reported_once_and_the_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  watch = preemption.Watch()
  assert not watch.reached(1)
  os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only sets a flag
  assert watch.reached(2)
  watch.close()
  assert signal.getsignal(signal.SIGTERM) is before
