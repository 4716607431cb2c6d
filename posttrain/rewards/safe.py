"""Run a function under a wall-clock deadline, from any thread.

`call_with_timeout(fn, args, timeout_s)` returns `fn(*args)` or raises `VerificationTimeout`.

How the deadline is enforced, and why:
- In the main thread (where RL trainers score their rollouts) it uses SIGALRM via
  `signal.setitimer`: the handler raises inside the running function, so a runaway sympy
  simplification or ANTLR parse is actually stopped and nothing keeps burning CPU. The exception
  derives from BaseException, so library code's `except Exception:` (math_verify has several)
  cannot swallow it; if something swallows it anyway, the alarm fires again every 50 ms until the
  call ends. Deadlines nest: an enclosing deadline is restored afterwards with its remaining time,
  and when it would fire first it alone bounds the call. math_verify's own timeouts also use
  SIGALRM but `signal.alarm(0)` on exit, which would cancel an enclosing deadline, so callers here
  turn them off and rely on this module instead.
- In any other thread signals cannot be used (Python delivers them to the main thread only), so the
  call runs in a daemon worker thread and the caller waits at most `timeout_s`. CPython cannot kill a
  thread: on timeout the worker is abandoned and runs on in the background. That is the guarded
  part: at most `MAX_ABANDONED_THREADS` abandoned workers may be alive at once; past that, calls
  from non-main threads fail fast with `VerificationTimeout` rather than pile up CPU-burning threads.

Neither mechanism can interrupt a single long C call (one enormous integer operation, a regex that
backtracks): the Python-level handler runs only when the C call returns, and a thread stuck in one keeps
the GIL, so even the waiting caller stalls. Verifiers therefore bound their inputs (answer length caps,
regexes without nested quantifiers) before doing expensive work, and symbolic math, whose inputs cannot
be bounded that way (`10^{10^{10}}` is short), runs in killable worker processes instead
(`posttrain.rewards.symbolic`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# Abandoned (timed-out, still running) worker threads tolerated before off-main-thread calls are refused.
MAX_ABANDONED_THREADS = 4
# After the deadline, the alarm fires again this often in case the function swallowed it.
_REFIRE_S = 0.05

_abandoned_threads: list[threading.Thread] = []
_abandoned_lock = threading.Lock()


class VerificationTimeout(Exception):
    """The function did not return within its deadline (or was refused, see `MAX_ABANDONED_THREADS`)."""


class _DeadlineExpired(BaseException):
    """Raised by the SIGALRM handler; BaseException so `except Exception:` in library code lets it through."""

    def __init__(self, token: object):
        super().__init__("deadline expired")
        self.token = token


def call_with_timeout(fn: Callable[..., Any], args: Sequence[Any], timeout_s: float) -> Any:
    """Return `fn(*args)`, or raise `VerificationTimeout` if it has not returned after `timeout_s` seconds.

    Works from any thread (see the module docstring for the two mechanisms). Exceptions raised by
    `fn` propagate unchanged. `timeout_s` must be a positive number of seconds.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if _alarm_available():
        return _call_with_alarm(fn, tuple(args), float(timeout_s))
    return _call_in_worker_thread(fn, tuple(args), float(timeout_s))


def _alarm_available() -> bool:
    # getsignal() is None when a non-Python handler is installed: it could not be restored afterwards.
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) is not None
    )


def _call_with_alarm(fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
    previous_handler = signal.getsignal(signal.SIGALRM)
    previous_delay, previous_interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < previous_delay <= timeout_s:
        # An enclosing deadline fires first; it alone bounds this call.
        return fn(*args)

    token = object()
    state = {"done": False, "restored": False}
    started = time.monotonic()

    def on_alarm(signum, frame):
        if state["done"]:
            return
        signal.setitimer(signal.ITIMER_REAL, _REFIRE_S)
        raise _DeadlineExpired(token)

    def restore() -> None:
        # Idempotent; the enclosing timer is re-armed last, once our handler is gone.
        if state["restored"]:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        state["restored"] = True
        if previous_delay > 0:
            remaining = previous_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), previous_interval)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return fn(*args)
        finally:
            # Set before any call, so an alarm landing during clean-up is a no-op. If one lands even
            # earlier, the exception leaves this block and the except below cleans up instead.
            state["done"] = True
            restore()
    except _DeadlineExpired as expired:
        state["done"] = True
        restore()
        if expired.token is not token:
            raise  # an enclosing deadline: its own call_with_timeout reports it
        name = getattr(fn, "__name__", repr(fn))
        raise VerificationTimeout(f"{name} did not return within {timeout_s:g} s") from None


def _call_in_worker_thread(fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
    name = getattr(fn, "__name__", repr(fn))
    with _abandoned_lock:
        _abandoned_threads[:] = [thread for thread in _abandoned_threads if thread.is_alive()]
        stuck = len(_abandoned_threads)
    if stuck >= MAX_ABANDONED_THREADS:
        logger.warning(
            "refusing to run %s: %d earlier calls are still running past their deadline in background "
            "threads; score from the main thread, where timed-out calls are interrupted",
            name,
            stuck,
        )
        raise VerificationTimeout(f"{name} refused: {stuck} timed-out calls still running")

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the waiting caller
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"posttrain-timeout-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        with _abandoned_lock:
            _abandoned_threads.append(worker)
        raise VerificationTimeout(f"{name} did not return within {timeout_s:g} s (left running in a thread)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
