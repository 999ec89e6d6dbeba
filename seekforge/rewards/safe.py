"""Rewards that can neither crash nor stall the trainer.

`safe_reward(fn, timeout_s)` runs `fn` in a small pool of long-lived worker processes, forked
from the caller so that any function works, picklable or not (a closure, a function loaded
from a user's file). A call costs one round trip through a pipe; nothing is spawned per call.
An exception, a non-number, a hang past the timeout or a dead worker makes the call return
None and increments a counter; a hung or dead worker is killed and replaced on demand.

Where fork is unavailable (Windows), or with isolation="thread" (for a reward that cannot run
in a forked child, e.g. one using CUDA), each call runs in a daemon thread instead. A thread
cannot be killed: a hung call returns None on time but keeps its thread busy until the
process exits.

The pool is not only for rewards: `result` checks what a call returns (by default a finite number or
None), so other untrusted computations (the dual chain's solvers) run behind the same barrier, and
`max_memory_mb` caps each worker's address space beyond what it had when forked.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from typing import Any

from seekforge.errors import ConfigError

RewardFn = Callable[..., "float | None"]
ISOLATIONS = ("auto", "process", "thread")
_COUNTER = {"error": "errors", "timeout": "timeouts", "crash": "crashes"}


@dataclass
class RewardCounters:
    calls: int = 0
    errors: int = 0  # the reward raised or returned something other than a number or None
    timeouts: int = 0
    crashes: int = 0  # the worker process died mid-call
    unjudged: int = 0  # the reward itself returned None
    last_error: str = ""


def _coerce(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward returned {type(value).__name__}, expected a number or None") from None
    if not math.isfinite(number):
        raise ValueError(f"reward returned {number}")
    return number


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux), None where /proc does not tell."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _limit_memory(max_memory_mb: int | None) -> None:
    """Cap the address space at what the forked worker already maps plus max_memory_mb: an allocation past
    it raises MemoryError in the worker (the parent's mappings, CUDA's included, are counted as they are)."""
    size = _address_space() if max_memory_mb is not None else None
    if size is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _exit_with(parent: int) -> None:
    """Exit this worker once `parent` is gone. The pipe's EOF cannot tell: the trainer's end of it lives on in
    sibling workers forked after us, so a trainer killed with SIGKILL would otherwise leave us running."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _serve(fn: RewardFn, result: Callable[[Any], Any], max_memory_mb: int | None, conn, parent: int) -> None:
    """Worker loop: answer (args, kwargs) with ("ok", value) or ("error", message)."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()
    # Ctrl-C is for the trainer, which then kills us; and a forked copy of the trainer's own
    # SIGTERM handler (say, save a checkpoint) must not run here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _limit_memory(max_memory_mb)
    while True:
        try:
            args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", result(fn(*args, **kwargs)))
        except Exception as e:  # MemoryError too: the worker survives an allocation its cap refused
            reply = ("error", f"{type(e).__name__}: {e}")
        conn.send(reply)


class _Worker:
    def __init__(self, fn: RewardFn, result: Callable[[Any], Any], max_memory_mb: int | None):
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(fn, result, max_memory_mb, child, os.getpid()),
                                daemon=True, name="seekforge-reward")
        self.proc.start()
        child.close()

    def call(self, args: tuple, kwargs: dict, timeout: float) -> tuple[str, Any]:
        self.conn.send((args, kwargs))
        # The sentinel, not EOF, tells us the worker died: its pipe end may live on in siblings.
        ready = wait([self.conn, self.proc.sentinel], timeout=max(timeout, 0.0))
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass
        if not ready:
            return "timeout", f"no result within {timeout:.3g}s"
        return "crash", f"worker exited with code {self.proc.exitcode}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class SafeReward:
    """`fn` behind a timeout and an exception barrier; call it like `fn`. Thread-safe."""

    def __init__(self, fn: RewardFn, timeout_s: float = 5.0, *, isolation: str = "auto",
                 max_workers: int | None = None, name: str | None = None,
                 result: Callable[[Any], Any] = _coerce, max_memory_mb: int | None = None):
        """`result` checks and converts what `fn` returns (raising TypeError or ValueError for what it
        refuses); `max_memory_mb` caps each worker process's new memory (process isolation only)."""
        if not callable(fn):
            raise ConfigError(f"safe_reward needs a callable, got {type(fn).__name__}")
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ConfigError(f"max_workers must be a positive integer, got {max_workers!r}")
        if max_memory_mb is not None and (not isinstance(max_memory_mb, int) or max_memory_mb < 1):
            raise ConfigError(f"max_memory_mb must be a positive integer, got {max_memory_mb!r}")
        if isolation not in ISOLATIONS:
            raise ConfigError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
        if isolation == "auto":
            isolation = "process" if "fork" in multiprocessing.get_all_start_methods() else "thread"
        elif isolation == "process" and "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("isolation='process' needs os.fork; use isolation='thread' on this platform")
        self.fn = fn
        self.result = result
        self.max_memory_mb = max_memory_mb
        self.timeout_s = float(timeout_s)
        self.isolation = isolation
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self.__name__ = name or getattr(fn, "__name__", "reward")
        self.counters = RewardCounters()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0

    def __call__(self, *args: Any, **kwargs: Any) -> float | None:
        deadline = time.monotonic() + self.timeout_s
        if self.isolation == "thread":
            status, value = self._call_in_thread(args, kwargs)
        else:
            status, value = self._call_in_process(args, kwargs, deadline)
        with self._cond:
            c = self.counters
            c.calls += 1
            if status == "ok":
                c.unjudged += value is None
                return value
            setattr(c, _COUNTER[status], getattr(c, _COUNTER[status]) + 1)
            c.last_error = f"{self.__name__}: {value}"
        return None

    def metrics(self) -> dict[str, float]:
        """Counters as numbers, for the trainer's logs."""
        with self._cond:
            return {k: float(v) for k, v in asdict(self.counters).items() if k != "last_error"}

    def close(self) -> None:
        """Stop the idle workers (busy ones are stopped when their call ends)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.kill()

    def _call_in_thread(self, args: tuple, kwargs: dict) -> tuple[str, Any]:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["ok"] = self.result(self.fn(*args, **kwargs))
            except Exception as e:
                box["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=run, daemon=True, name=f"reward-{self.__name__}")
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            return "timeout", f"no result within {self.timeout_s:.3g}s (its thread keeps running)"
        return ("ok", box["ok"]) if "ok" in box else ("error", box["error"])

    def _call_in_process(self, args: tuple, kwargs: dict, deadline: float) -> tuple[str, Any]:
        worker = self._acquire(deadline)
        if worker is None:
            return "timeout", f"no free worker within {self.timeout_s:.3g}s"
        healthy = False
        try:
            status, value = worker.call(args, kwargs, deadline - time.monotonic())
            healthy = status in ("ok", "error")
            return status, value
        except Exception as e:  # the arguments could not be sent (unpicklable, broken pipe)
            return "error", f"could not call the reward worker: {type(e).__name__}: {e}"
        finally:
            self._release(worker, healthy)

    def _acquire(self, deadline: float) -> _Worker | None:
        with self._cond:
            while not self._idle and self._live >= self.max_workers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return _Worker(self.fn, self.result, self.max_memory_mb)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            if healthy:
                self._idle.append(worker)
            else:
                self._live -= 1
            self._cond.notify()
        if not healthy:
            worker.kill()


def safe_reward(fn: RewardFn, timeout_s: float = 5.0, **options: Any) -> SafeReward:
    """`fn` wrapped so that exceptions and hangs return None and are counted (see SafeReward)."""
    return SafeReward(fn, timeout_s, **options)
