"""An ``AsyncVectorEnv`` whose dead or frozen workers become a clear error, and whose ``close()`` ends them all.

Gymnasium's ``AsyncVectorEnv`` waits forever for a worker that stopped answering (``timeout=None``), surfaces a
killed worker as a bare ``BrokenPipeError``/``EOFError``, and its ``close()`` can raise again and leave the
other workers running. :class:`GuardedAsyncVectorEnv` waits at most ``worker_timeout`` seconds for every
``reset``/``step``/``call``, turns both failures into :class:`EnvWorkerError` naming the workers (index, PID,
exit code), and then stops every worker (SIGTERM, then SIGKILL, which also ends a stopped process).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
from gymnasium.vector.async_vector_env import AsyncState

DEFAULT_WORKER_TIMEOUT = 120.0


class EnvWorkerError(RuntimeError):
    """A worker process of an async vector env died or did not answer within the timeout."""


class GuardedAsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """``gym.vector.AsyncVectorEnv`` with a per-call ``worker_timeout`` (seconds; None waits forever)."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], *, worker_timeout: float | None = DEFAULT_WORKER_TIMEOUT,
                 **kwargs: Any) -> None:
        if worker_timeout is not None and not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be positive (or None), got {worker_timeout}")
        self.worker_timeout = worker_timeout
        super().__init__(env_fns, **kwargs)

    def reset(self, *, seed=None, options=None):
        return self._guard("reset", lambda: self.reset_async(seed=seed, options=options), self.reset_wait)

    def step(self, actions):
        return self._guard("step", lambda: self.step_async(actions), self.step_wait)

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return self._guard(f"call {name!r}", lambda: self.call_async(name, *args, **kwargs), self.call_wait)

    def _guard(self, what: str, send: Callable[[], None], wait: Callable[..., Any]):
        try:
            send()
            return wait(timeout=self.worker_timeout)
        except multiprocessing.TimeoutError:
            raise self._failure(what, frozen=True) from None
        except (EOFError, BrokenPipeError, ConnectionResetError) as err:
            raise self._failure(what, frozen=False) from err

    def _failure(self, what: str, frozen: bool) -> EnvWorkerError:
        if not frozen:  # a broken pipe: the worker is exiting; give the OS a moment to reap it (busy machines)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and all(p.is_alive() for p in self.processes):
                time.sleep(0.01)
        dead = [f"{i} (pid {p.pid}, exit code {p.exitcode})" for i, p in enumerate(self.processes)
                if not p.is_alive()]
        silent = []
        if frozen:
            for i, pipe in enumerate(self.parent_pipes):
                with contextlib.suppress(OSError, ValueError):
                    if pipe is not None and not pipe.closed and not pipe.poll(0):
                        silent.append(f"{i} (pid {self.processes[i].pid})")
        parts = []
        if dead:
            parts.append(f"worker(s) {', '.join(dead)} died")
        if silent and not dead:
            parts.append(f"worker(s) {', '.join(silent)} did not answer within {self.worker_timeout:g} s (frozen?)")
        desc = "; ".join(parts) or ("a worker did not answer in time" if frozen else "a worker's pipe broke")
        self.close(terminate=True)
        return EnvWorkerError(f"async vector env ({self.num_envs} workers): {desc} during {what}; all workers "
                              f"were stopped (worker_timeout={self.worker_timeout} s)")

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """End every worker: a polite ``close`` (bounded by ``timeout`` or ``worker_timeout``) when all are
        healthy, else (or after a failure) SIGTERM, then SIGKILL for any still alive after a second."""
        timeout = self.worker_timeout if timeout is None else timeout
        if not terminate:
            try:
                if self._state != AsyncState.DEFAULT:  # a pending call: collect it first (bounded)
                    getattr(self, f"{self._state.value}_wait")(timeout)
                pipes = [p for p in self.parent_pipes if p is not None and not p.closed]
                for pipe in pipes:
                    pipe.send(("close", None))
                deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
                for pipe in pipes:
                    if not pipe.poll(max(deadline - time.monotonic(), 0)):
                        raise multiprocessing.TimeoutError
                    pipe.recv()
            except Exception:  # noqa: BLE001 - a dead or frozen worker: terminate all of them below
                pass
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout=1.0)
            if p.is_alive():
                p.kill()  # also ends a stopped (SIGSTOP) process, which ignores SIGTERM until continued
                p.join(timeout=5.0)
        for pipe in self.parent_pipes:
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
