"""Symbolic math equivalence in killable worker processes: a small pool, reused across calls, whose worker is
killed and replaced when a call outlives its deadline.

Why processes and not threads or signals: sympy evaluates `10^{10^{10}}` or `9^{9^{9}}` as one big-integer
power, a single C call that holds the GIL for minutes. A SIGALRM handler only runs when that call returns, and a
thread running it cannot be stopped, while its GIL starves the thread waiting on `join(timeout)`. A process can
be killed at any moment, from any thread. Each worker is a fresh interpreter (`serve` below, started with fork +
exec, so a parent holding torch threads is no problem) that
imports math_verify once and then answers one request a line on its stdin/stdout; the pool keeps up to
`POOL_SIZE` of them, started on first use.

`SymbolicPool.equivalent(gold, predicted, timeout_s)` returns math_verify's verdict, or raises
`VerificationTimeout` when `timeout_s` seconds pass first, counting the wait for a free or starting worker. A
worker still starting when the deadline passes is kept (its start-up is not the runaway); a worker that was
computing is killed (SIGKILL) and a replacement started at once. A worker that dies or answers garbage is
replaced too, and the call raises `SymbolicWorkerError`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from posttrain.rewards.safe import VerificationTimeout

POOL_SIZE = 2  # concurrent symbolic checks; the machines this runs on have few cores to spare for rewards
LEASE_GRACE_S = 1.0  # past its call's deadline by this much, a leased worker is presumed lost and replaced
MEMORY_LIMIT_BYTES = 8 << 30  # address space of one worker: a runaway power fails with MemoryError, not swap
_READY = "ready"


@contextlib.contextmanager
def _alarm_deferred():
    """Hold SIGALRM (an enclosing `safe.call_with_timeout` deadline, which re-fires every 50 ms) while the pool
    starts, kills or files a worker, so that no half-done bookkeeping leaks a process."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SymbolicWorkerError(RuntimeError):
    """A worker exited or answered something that is not a verdict (it has been replaced)."""


class _Worker:
    """One worker process and the unread bytes of its stdout."""

    def __init__(self):
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=package_root,
            env=env,
        )
        self.ready = False
        self._buffer = b""

    def read_line(self, deadline: float) -> str | None:
        """The next line from the worker, or None if `deadline` (time.monotonic) passes first."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SymbolicWorkerError(f"symbolic worker {self.process.pid} exited ({self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def send(self, request: list[str]) -> None:
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:  # a broken pipe to a killed worker: nothing left to flush
                pass


class SymbolicPool:
    """Up to `size` workers; see the module docstring. Thread-safe.

    A call leases its worker until its deadline plus `LEASE_GRACE_S`. A call normally hands the worker back (or
    has it replaced) itself; one cut off by an enclosing deadline at an unlucky moment may lose track of it, so
    workers whose lease has run out are killed and replaced by the next call instead of leaking.
    """

    def __init__(self, size: int = POOL_SIZE):
        if size < 1:
            raise ValueError(f"a symbolic pool needs at least one worker, got size={size}")
        self.size = size
        self._idle: list[_Worker] = []
        self._busy: dict[_Worker, float] = {}  # leased workers and when their lease runs out (time.monotonic)
        self._live = 0  # idle + busy + starting workers
        self._free = threading.Condition()
        self.killed = 0  # workers killed for outliving a deadline (for tests and logs)

    def equivalent(self, gold: str, predicted: str, timeout_s: float) -> bool:
        """math_verify's `verify(parse(gold), parse(predicted))`, within `timeout_s` seconds or VerificationTimeout."""
        deadline = time.monotonic() + timeout_s
        worker = self._acquire(deadline, timeout_s)
        if not worker.ready:
            self._start(worker, deadline, timeout_s)
        try:
            worker.send([gold, predicted])
            line = worker.read_line(deadline)
        except BaseException:  # an outer deadline or a dead worker: its state is unknown, so replace it
            self._replace(worker)
            raise
        if line is None:
            self._replace(worker)
            with self._free:
                self.killed += 1
            raise VerificationTimeout(f"symbolic check did not return within {timeout_s:g} s (worker killed)")
        try:
            verdict = json.loads(line)
        except json.JSONDecodeError:
            verdict = None
        if not isinstance(verdict, dict) or not isinstance(verdict.get("equal"), bool):
            self._replace(worker)
            raise SymbolicWorkerError(f"symbolic worker answered {line[:200]!r}")
        self._release(worker)
        return verdict["equal"]

    def close(self) -> None:
        """Kill the idle workers (busy ones are killed by their callers' deadlines)."""
        with self._free:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.kill()

    def _acquire(self, deadline: float, timeout_s: float) -> _Worker:
        lease = deadline + LEASE_GRACE_S
        while True:
            self._reap()
            with self._free:
                if self._idle:
                    worker = next((w for w in self._idle if w.ready), self._idle[0])
                    self._idle.remove(worker)
                    self._busy[worker] = lease
                    return worker
                if self._live < self.size:
                    self._live += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VerificationTimeout(f"no symbolic worker became free within {timeout_s:g} s")
                self._free.wait(min(remaining, 0.25))  # wake up now and then to reap expired leases
        with _alarm_deferred():
            try:
                worker = _Worker()
            except BaseException:
                with self._free:
                    self._live -= 1
                    self._free.notify()
                raise
            with self._free:
                self._busy[worker] = lease
        return worker

    def _start(self, worker: _Worker, deadline: float, timeout_s: float) -> None:
        """Wait for `worker`'s ready line. Past the deadline (ours or an enclosing one) the worker goes back to the
        pool still starting; one that exits or says something else is replaced."""
        try:
            line = worker.read_line(deadline)
        except SymbolicWorkerError:
            self._replace(worker)
            raise
        except BaseException:
            self._release(worker)
            raise
        if line is None:
            self._release(worker)
            raise VerificationTimeout(f"the symbolic worker did not start within {timeout_s:g} s")
        if line != _READY:
            self._replace(worker)
            raise SymbolicWorkerError(f"symbolic worker failed to start: {line[:200]!r}")
        worker.ready = True

    def _release(self, worker: _Worker) -> None:
        with _alarm_deferred(), self._free:
            if self._busy.pop(worker, None) is not None:  # else its lease ran out and it was replaced already
                self._idle.append(worker)
                self._free.notify()

    def _replace(self, worker: _Worker) -> None:
        """Kill the leased `worker` and start its replacement now, so it has warmed up by the next call."""
        with _alarm_deferred():
            with self._free:
                leased = self._busy.pop(worker, None) is not None
            if leased:
                self._renew(worker)
            else:
                worker.kill()

    def _reap(self) -> None:
        now = time.monotonic()
        with _alarm_deferred():
            with self._free:
                expired = [worker for worker, lease in self._busy.items() if lease < now]
                for worker in expired:
                    del self._busy[worker]
            for worker in expired:
                self._renew(worker)

    def _renew(self, worker: _Worker) -> None:
        """Kill `worker` (no longer leased nor idle) and file a fresh one as idle."""
        with _alarm_deferred():
            worker.kill()
            try:
                replacement = _Worker()
            except BaseException:
                with self._free:
                    self._live -= 1
                    self._free.notify()
                raise
            with self._free:
                self._idle.append(replacement)
                self._free.notify()


_pool: SymbolicPool | None = None
_pool_lock = threading.Lock()


def shared_pool() -> SymbolicPool:
    """The process-wide pool (created on first use, closed at exit)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = SymbolicPool()
            atexit.register(_pool.close)
        return _pool


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):  # not on this platform, or a lower hard limit already: keep it
        pass


def serve() -> None:
    """The worker's loop: one JSON [gold, predicted] a line in, one {"equal": bool} (or {"error": ...}) a line out."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled", once per call
    _limit_memory()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def parsed(answer: str) -> list:
        extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
        return parse(f"${answer}$", extraction_config=extraction, parsing_timeout=None)

    out = sys.stdout
    out.write(_READY + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            gold, predicted = json.loads(line)
            reply = {"equal": bool(verify(parsed(gold), parsed(predicted), timeout_seconds=None))}
        except (Exception, MemoryError) as error:  # noqa: B014 (MemoryError named: the limit above raises it)
            reply = {"error": f"{type(error).__name__}: {error}"[:500], "equal": False}
        out.write(json.dumps(reply) + "\n")
        out.flush()
