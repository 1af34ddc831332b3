"""One process per env, with restart of crashed processes.

Why not gymnasium's AsyncVectorEnv: the chunk contract needs to step only the envs that are not
done yet (nothing may be executed in an env after its episode ended inside a chunk), to reset single
envs with chosen seeds, and to survive a dead worker process; AsyncVectorEnv steps all envs at once,
auto-resets on its own schedule and cannot replace a dead worker. This pool is a small pipe protocol
over `multiprocessing` (spawn context: SAPIEN/Vulkan and MuJoCo/EGL state must not be forked).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import traceback
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class EnvWorkerError(RuntimeError):
    """The simulator inside env `env_index` raised; the message carries the worker's traceback."""

    def __init__(self, env_index: int, message: str):
        super().__init__(f"env {env_index}: {message}")
        self.env_index = env_index


class WorkerCrashed(RuntimeError):
    """Internal: the process of one env died or stopped answering."""


def _worker_main(conn, factory: Callable[[], Any], env_index: int) -> None:
    # Children ignore Ctrl-C: the parent decides when they stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(conn, factory)
    except (EOFError, OSError):
        pass  # the parent is gone (killed, or it closed the pipe): nobody is left to answer
    finally:
        # Leave without the interpreter's exit handlers. After a simulator ran here they can hang:
        # the env workers of a SIGTERMed trainer were found spinning at 100% CPU for over 10 minutes
        # in torch's static destructors (malloc_consolidate), 32 orphans holding ~16 GiB.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)


def _serve(conn, factory: Callable[[], Any]) -> None:
    """Build the env, then answer the parent's commands until "close" or until the pipe breaks."""
    try:
        env = factory()
    except BaseException:  # report construction errors (e.g. missing assets) instead of dying
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ok", env.spec()))
    while True:
        cmd, payload = conn.recv()  # EOFError once the parent is gone
        if cmd == "close":
            try:
                env.close()
            finally:
                conn.send(("ok", None))
            break
        try:
            if cmd == "reset":
                result = env.reset(*payload)
            elif cmd == "step":
                result = env.step(payload)
            elif cmd == "step_chunk":
                # Several actions in one message (one pipe round trip per chunk, not per step);
                # stops after the step that ends the episode, exactly as stepping one by one would.
                result = []
                for action in payload:
                    result.append(env.step(action))
                    if result[-1][2] or result[-1][3]:
                        break
            elif cmd == "call":
                name, args = payload
                result = getattr(env, name)(*args)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply = ("ok", result)
        except Exception:  # the simulator raised: the parent raises EnvWorkerError with this text
            reply = ("error", traceback.format_exc())
        conn.send(reply)
    conn.close()


class SubprocEnvPool:
    """`num_envs` single-env workers; `factories[i]()` builds env i inside its own process.

    A single env object must offer spec(), reset(seed) -> (obs, info), step(action) ->
    (obs, reward, terminated, truncated, info) and close(). Calls to several envs run in parallel.
    """

    def __init__(self, factories: Sequence[Callable[[], Any]], timeout_s: float = 300.0,
                 start_method: str = "spawn", start_wave: int | None = None):
        self._factories = list(factories)
        self._timeout_s = timeout_s
        self._ctx = mp.get_context(start_method)
        self._procs: list[Any] = [None] * len(self._factories)
        self._conns: list[Any] = [None] * len(self._factories)
        self.specs: list[Any] = [None] * len(self._factories)
        self.restart_counts = [0] * len(self._factories)
        # Workers start in waves of `start_wave` (default: 4 per core). Each start imports torch and
        # the simulator (seconds of CPU); 64 at once on 2 cores kept the first one from answering
        # within timeout_s, although nothing was wrong.
        wave = max(1, start_wave or 4 * (os.cpu_count() or 1))
        try:
            for first in range(0, len(self._factories), wave):
                batch = range(first, min(first + wave, len(self._factories)))
                for i in batch:
                    self._launch(i)
                for i in batch:
                    self.specs[i] = self._await_ready(i)
        except BaseException:
            self.close()  # no orphaned simulator processes
            raise

    @property
    def num_envs(self) -> int:
        return len(self._factories)

    def pid(self, index: int) -> int:
        return self._procs[index].pid

    def _launch(self, index: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._factories[index], index),
                                 daemon=True, name=f"pirl-env-{index}")
        proc.start()
        child.close()
        self._procs[index], self._conns[index] = proc, parent

    def _await_ready(self, index: int):
        status, payload = self._recv(index)
        if status == "error":
            self._reap(index)
            raise EnvWorkerError(index, f"could not build the env:\n{payload}")
        return payload

    def _recv(self, index: int):
        conn = self._conns[index]
        try:
            if not conn.poll(self._timeout_s):
                raise WorkerCrashed(f"env {index}: no answer within {self._timeout_s} s")
            return conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError, OSError) as exc:
            raise WorkerCrashed(f"env {index}: worker process died ({exc!r})") from exc

    def _send(self, index: int, message) -> None:
        try:
            self._conns[index].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise WorkerCrashed(f"env {index}: worker process died ({exc!r})") from exc

    def _reap(self, index: int) -> None:
        proc = self._procs[index]
        if proc is not None and proc.is_alive():
            proc.kill()
        if proc is not None:
            proc.join(timeout=10)
        if self._conns[index] is not None:
            self._conns[index].close()

    def restart(self, index: int) -> None:
        """Replace the process of env `index` by a fresh one (the env is rebuilt, not reset)."""
        log.warning("env %d: worker process crashed; restarting it", index)
        self._reap(index)
        self._launch(index)
        self.specs[index] = self._await_ready(index)
        self.restart_counts[index] += 1

    def call_many(self, cmd: str, indices: Sequence[int], payloads: Sequence[Any]):
        """Send `cmd` to each env in `indices` (in parallel); returns ({index: result}, crashed).

        Crashed envs are restarted before returning and listed in `crashed` (their result is
        missing). A Python exception inside an env is raised as EnvWorkerError.
        """
        crashed: list[int] = []
        sent: list[int] = []
        for index, payload in zip(indices, payloads):
            try:
                self._send(index, (cmd, payload))
                sent.append(index)
            except WorkerCrashed:
                crashed.append(index)
        results: dict[int, Any] = {}
        errors: list[tuple[int, str]] = []
        for index in sent:
            try:
                status, payload = self._recv(index)
            except WorkerCrashed:
                crashed.append(index)
                continue
            if status == "error":
                errors.append((index, payload))
            else:
                results[index] = payload
        for index in crashed:
            self.restart(index)
        if errors:
            index, message = errors[0]
            raise EnvWorkerError(index, message)
        return results, sorted(crashed)

    def close(self) -> None:
        for index, conn in enumerate(self._conns):
            if conn is None or conn.closed:
                continue
            try:
                conn.send(("close", None))
                if conn.poll(10):
                    conn.recv()
            except (OSError, EOFError):
                pass
        for index in range(len(self._procs)):
            self._reap(index)

    def kill_worker(self, index: int) -> None:
        """Kill one worker process (used by tests and fault-injection to check recovery)."""
        os.kill(self._procs[index].pid, signal.SIGKILL)
        self._procs[index].join(timeout=10)
