"""Worker processes that each host one or several envs, with restart of crashed processes.

Why not gymnasium's AsyncVectorEnv: the chunk contract needs to step only the envs that are not
done yet (nothing may be executed in an env after its episode ended inside a chunk), to reset single
envs with chosen seeds, and to survive a dead worker process; AsyncVectorEnv steps all envs at once,
auto-resets on its own schedule and cannot replace a dead worker. This pool is a small pipe protocol
over `multiprocessing` (spawn context: SAPIEN/Vulkan and MuJoCo/EGL state must not be forked).

Why several envs per process (`envs_per_process`): one process per env put 16 SAPIEN processes on 2
cores; every chunk then woke 16 processes, each with its own torch/SAPIEN working set, and a step
cost several times what it costs in a lone process (bench/results/rl_throughput.md). A worker
process steps its envs one after the other, each for its whole sub-chunk, and answers the parent
once per command: one pipe round trip per process and chunk. Envs never share state: each has its
own scene and seeds, so the grouping does not change what an env returns.

A command's send and receipt can be split (`send_many`, then `receive_many`): the parent may compute
while the processes work. The RL rollout (`pirl.train.rl_core.collect_rollout`) steps one process's
envs while the model computes the next chunk of another's.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class EnvWorkerError(RuntimeError):
    """The simulator inside env `env_index` raised; the message carries the worker's traceback."""

    def __init__(self, env_index: int, message: str):
        super().__init__(f"env {env_index}: {message}")
        self.env_index = env_index


class WorkerCrashed(RuntimeError):
    """Internal: a worker process died or stopped answering."""


@dataclass
class PendingCall:
    """A command sent by `SubprocEnvPool.send_many` whose answers are not read yet."""

    cmd: str
    indices: list[int]  # env indices in the caller's order (the first failing one is raised)
    items: dict[int, list]  # worker -> [(local env index, payload), ...] as sent
    sent: list[int] = field(default_factory=list)  # workers that got the message, answer not read
    dead: list[int] = field(default_factory=list)  # workers found dead, not restarted yet


def _worker_main(conn, factories: Sequence[Callable[[], Any]], worker_index: int) -> None:
    # Children ignore Ctrl-C: the parent decides when they stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(conn, factories)
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


def _run_env_command(env, cmd: str, payload):
    """One command on one env of this process; returns its result (raises what the env raises)."""
    if cmd == "reset":
        return env.reset(*payload)
    if cmd == "step":
        return env.step(payload)
    if cmd == "step_chunk":
        # Several actions in one message (one pipe round trip per chunk, not per step);
        # stops after the step that ends the episode, exactly as stepping one by one would.
        result = []
        for action in payload:
            result.append(env.step(action))
            if result[-1][2] or result[-1][3]:
                break
        return result
    if cmd == "call":
        name, args = payload
        return getattr(env, name)(*args)
    raise ValueError(f"unknown command {cmd!r}")


def _serve(conn, factories: Sequence[Callable[[], Any]]) -> None:
    """Build the envs, then answer the parent's commands until "close" or until the pipe breaks.

    A command is (cmd, [(local env index, payload), ...]); the answer is ("ok", [(status, result)
    per listed env], seconds spent inside the envs). Each env's exception is caught and reported on
    its own, so one failing env does not hide the results of the others in this process.
    """
    envs = []
    for local, factory in enumerate(factories):
        try:
            envs.append(factory())
        except BaseException:  # report construction errors (e.g. missing assets) instead of dying
            conn.send(("error", (local, traceback.format_exc())))
            conn.close()
            return
    conn.send(("ok", [env.spec() for env in envs]))
    while True:
        cmd, items = conn.recv()  # EOFError once the parent is gone
        if cmd == "close":
            try:
                for env in envs:
                    with contextlib.suppress(Exception):
                        env.close()
            finally:
                conn.send(("ok", None, 0.0))
            break
        started = time.perf_counter()
        replies = []
        for local, payload in items:
            try:
                replies.append(("ok", _run_env_command(envs[local], cmd, payload)))
            except Exception:  # the simulator raised: the parent raises EnvWorkerError with this text
                replies.append(("error", traceback.format_exc()))
        conn.send(("ok", replies, time.perf_counter() - started))
    conn.close()


_gc_frozen = False


def freeze_gc_after_imports(*modules: str) -> None:
    """Import `modules`, then (once per process) move every object alive to the GC's permanent
    generation, before any env exists.

    Why: the cyclic garbage collector walks all tracked objects on a full collection, and a worker
    holds ~360k of them from torch and the simulator's imports, none of which ever become garbage.
    Simulators that call gc.collect() (ManiSkill on every scene rebuild) pay for that walk each
    time. Only objects alive now are exempt, so envs built later, and their old scenes, are still
    collected; freezing again after an env was built would exempt that env's first scene, which
    then leaks when the scene is rebuilt, hence once per process.
    """
    global _gc_frozen
    for name in modules:
        importlib.import_module(name)
    if not _gc_frozen:
        gc.collect()
        gc.freeze()
        _gc_frozen = True


def group_envs(num_envs: int, envs_per_process: int) -> list[list[int]]:
    """Env indices per worker process: consecutive runs of `envs_per_process` (the last may be short)."""
    if envs_per_process < 1:
        raise ValueError(f"envs_per_process must be >= 1, got {envs_per_process}")
    return [list(range(first, min(first + envs_per_process, num_envs)))
            for first in range(0, num_envs, envs_per_process)]


class SubprocEnvPool:
    """`num_envs` single envs in worker processes; `factories[i]()` builds env i inside its process.

    Env i lives in worker `i // envs_per_process` together with its neighbours. A single env object
    must offer spec(), reset(seed) -> (obs, info), step(action) -> (obs, reward, terminated,
    truncated, info) and close(). Calls to envs in different processes run in parallel; envs of one
    process run one after the other. A dead process takes all its envs with it: all are rebuilt and
    reported as crashed. Methods that take an `index` take an env index.
    """

    def __init__(self, factories: Sequence[Callable[[], Any]], timeout_s: float = 300.0,
                 start_method: str = "spawn", start_wave: int | None = None, envs_per_process: int = 1):
        self._factories = list(factories)
        self._timeout_s = timeout_s
        self._ctx = mp.get_context(start_method)
        self.groups = group_envs(len(self._factories), envs_per_process)
        self._worker_of = [w for w, group in enumerate(self.groups) for _ in group]
        self._procs: list[Any] = [None] * len(self.groups)
        self._conns: list[Any] = [None] * len(self.groups)
        self.specs: list[Any] = [None] * len(self._factories)
        self.restart_counts = [0] * len(self._factories)
        # Seconds each worker spent inside its envs' calls (what the parent waited for, less IPC).
        self.busy_s = [0.0] * len(self.groups)
        self._awaiting: set[int] = set()  # workers sent a command whose answer is not read yet
        # Workers start in waves of `start_wave` (default: 4 per core). Each start imports torch and
        # the simulator (seconds of CPU); 64 at once on 2 cores kept the first one from answering
        # within timeout_s, although nothing was wrong.
        wave = max(1, start_wave or 4 * (os.cpu_count() or 1))
        try:
            for first in range(0, len(self.groups), wave):
                batch = range(first, min(first + wave, len(self.groups)))
                for w in batch:
                    self._launch(w)
                for w in batch:
                    self._await_ready(w)
        except BaseException:
            self.close()  # no orphaned simulator processes
            raise

    @property
    def num_envs(self) -> int:
        return len(self._factories)

    @property
    def num_workers(self) -> int:
        return len(self.groups)

    def worker_of(self, index: int) -> int:
        """The worker process that hosts env `index`."""
        return self._worker_of[index]

    def pid(self, index: int) -> int:
        """Process id of the worker that hosts env `index`."""
        return self._procs[self._worker_of[index]].pid

    def _launch(self, worker: int) -> None:
        parent, child = self._ctx.Pipe()
        factories = [self._factories[i] for i in self.groups[worker]]
        proc = self._ctx.Process(target=_worker_main, args=(child, factories, worker),
                                 daemon=True, name=f"pirl-env-{worker}")
        proc.start()
        child.close()
        self._procs[worker], self._conns[worker] = proc, parent

    def _await_ready(self, worker: int) -> None:
        # Building is sequential inside a worker: allow timeout_s per env it builds.
        status, payload = self._recv(worker, self._timeout_s * len(self.groups[worker]))[:2]
        if status == "error":
            local, message = payload
            self._reap(worker)
            raise EnvWorkerError(self.groups[worker][local], f"could not build the env:\n{message}")
        for index, spec in zip(self.groups[worker], payload):
            self.specs[index] = spec

    def _describe(self, worker: int) -> str:
        envs = self.groups[worker]
        return f"env {envs[0]}" if len(envs) == 1 else f"envs {envs} (worker {worker})"

    def _recv(self, worker: int, timeout_s: float):
        conn = self._conns[worker]
        try:
            if not conn.poll(timeout_s):
                raise WorkerCrashed(f"{self._describe(worker)}: no answer within {timeout_s} s")
            return conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError, OSError) as exc:
            raise WorkerCrashed(f"{self._describe(worker)}: worker process died ({exc!r})") from exc

    def _send(self, worker: int, message) -> None:
        try:
            self._conns[worker].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise WorkerCrashed(f"{self._describe(worker)}: worker process died ({exc!r})") from exc

    def _reap(self, worker: int) -> None:
        proc = self._procs[worker]
        if proc is not None and proc.is_alive():
            proc.kill()
        if proc is not None:
            proc.join(timeout=10)
        if self._conns[worker] is not None:
            self._conns[worker].close()

    def restart(self, index: int) -> None:
        """Replace the process of env `index` by a fresh one; every env it hosts is rebuilt, not reset."""
        self._restart_worker(self._worker_of[index])

    def _restart_worker(self, worker: int) -> None:
        log.warning("%s: worker process crashed; restarting it", self._describe(worker))
        self._reap(worker)
        self._awaiting.discard(worker)  # whatever it owed died with it
        self._launch(worker)
        self._await_ready(worker)
        for index in self.groups[worker]:
            self.restart_counts[index] += 1

    def _by_worker(self, indices: Sequence[int], payloads: Sequence[Any]) -> dict[int, list]:
        """{worker: [(local env index, payload), ...]} in the order of `indices`."""
        items: dict[int, list] = {}
        for index, payload in zip(indices, payloads):
            worker = self._worker_of[index]
            items.setdefault(worker, []).append((self.groups[worker].index(index), payload))
        return items

    def call_many(self, cmd: str, indices: Sequence[int], payloads: Sequence[Any]):
        """Send `cmd` to each env in `indices`; returns ({index: result}, crashed).

        Each worker process gets one message with all its listed envs, and the processes run in
        parallel. `crashed` lists every env of a process that died, including envs of that process
        that were not in `indices` (their state is lost too); those processes are restarted before
        returning and their envs have no result. A Python exception inside an env is raised as
        EnvWorkerError naming the first failing env (in the order of `indices`).
        """
        return self.receive_many(self.send_many(cmd, indices, payloads))

    def send_many(self, cmd: str, indices: Sequence[int], payloads: Sequence[Any]) -> PendingCall:
        """The first half of `call_many`: send the messages and return at once, while the processes
        work; `receive_many` waits for their answers. Meanwhile the caller may compute, or send to
        other processes (a pipelined rollout steps one process's envs while the model acts for the
        others'). A process takes one command at a time: sending to one whose answer is still
        pending raises, as its answers would otherwise be read by the wrong call."""
        items = self._by_worker(indices, payloads)
        busy = sorted(set(items) & self._awaiting)
        if busy:
            raise RuntimeError(f"worker(s) {busy} still owe the answer to an earlier command")
        pending = PendingCall(cmd, list(indices), items)
        for worker, worker_items in items.items():
            try:
                self._send(worker, (cmd, worker_items))
                pending.sent.append(worker)
                self._awaiting.add(worker)
            except WorkerCrashed:
                pending.dead.append(worker)
        return pending

    def receive_many(self, pending: PendingCall):
        """The second half of `call_many` (see there): the answers to `pending`, after which the
        processes that died are restarted. Every answer is read before an env's error is raised, and
        read once: receiving `pending` again returns nothing (so a caller that stopped on an error
        can make sure that nothing is left unread)."""
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        dead, pending.dead = pending.dead, []
        while pending.sent:
            worker = pending.sent.pop(0)
            self._awaiting.discard(worker)
            try:
                _, replies, busy = self._recv(worker, self._timeout_s * len(pending.items[worker]))
            except WorkerCrashed:
                dead.append(worker)
                continue
            self.busy_s[worker] += busy
            for (local, _), (status, payload) in zip(pending.items[worker], replies):
                index = self.groups[worker][local]
                if status == "error":
                    errors[index] = payload
                else:
                    results[index] = payload
        for worker in dead:
            self._restart_worker(worker)
        if errors:
            index = next(i for i in pending.indices if i in errors)
            raise EnvWorkerError(index, errors[index])
        return results, sorted(i for worker in dead for i in self.groups[worker])

    def close(self) -> None:
        for conn in self._conns:
            if conn is None or conn.closed:
                continue
            try:
                conn.send(("close", None))
                if conn.poll(10):
                    conn.recv()
            except (OSError, EOFError):
                pass
        for worker in range(len(self._procs)):
            self._reap(worker)

    def kill_worker(self, index: int) -> None:
        """Kill the process of env `index` (and so every env it hosts): tests and fault injection."""
        worker = self._worker_of[index]
        os.kill(self._procs[worker].pid, signal.SIGKILL)
        self._procs[worker].join(timeout=10)
