"""One action per control step from a chunk-serving policy, optionally with the next chunk fetched ahead.

    broker = ActionChunkBroker(WebsocketClientPolicy("127.0.0.1", 8000), action_horizon=5, prefetch_steps=2)
    while robot.running():
        robot.apply(broker.infer(robot.observation())["actions"])   # [D], this step's action

A π0 policy answers a chunk of H actions per request; a robot executes `action_horizon` (n) of them and
asks again. openpi's client does that synchronously (`openpi_client.action_chunk_broker`): at every n-th
step the robot waits for the server, so each chunk costs n control periods plus one inference latency.

`prefetch_steps` (d) hides that latency. d steps before the current chunk runs out, the broker sends that
step's observation in a background thread and keeps handing out the current chunk. The answer is a chunk
computed from an observation d steps old: its action i is meant for step (request step + i), so the broker
starts it at index d, the action for the step the robot has reached, and executes indices d .. d + n - 1
(so n + d <= H). If the answer is not back by the switch step, `infer` waits for it and counts a stall
(`stats`). d = 0 is openpi's synchronous broker exactly.

Choosing d: the smallest number of control periods that covers the inference latency (p99, as the server
reports in `server_timing` and `/stats`, plus the network), so that stalls stay at zero. The cost of a
larger d is that each chunk acts on an older observation.

`seed`: every request carries {"seed": seed, "noise_index": k} for the episode's k-th chunk (as `pirl eval`
does), so an episode with the same observations gets the same actions; without it the server draws one.

`inpaint`: every request after an episode's first also carries the current chunk's actions still to run
("prev_actions", with "prev_delay" = d), and the server steers the new chunk onto them (real-time chunking,
docs/serve.md): its first d actions, which the robot runs from the current chunk anyway, are pulled onto
those, so the chunk it switches to continues the motion instead of jumping to another plan. `inpaint_beta`
caps how hard ("prev_beta"; the server's default 5 when None). A stronger pull is smoother and less
reactive: measure both with `pirl eval prefetch_steps=d inpaint=true inpaint_beta=...` first.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class ActionChunkBroker:
    """Wraps anything with openpi's `infer(obs) -> {"actions": [H, D], ...}` (pirl's or openpi's websocket
    client) and returns one step per `infer` call: {"actions": [D], "chunk_index", "chunk_step", and the
    chunk's other fields (timings, seed) as they came}. Same constructor and methods as openpi's broker,
    plus `prefetch_steps`, `seed`, `inpaint` and `inpaint_beta`.

    Not thread-safe: one control loop calls `infer`. The policy's connection is used by one request at a
    time (a prefetch is the only request in flight while it runs).
    """

    def __init__(self, policy, action_horizon: int, *, prefetch_steps: int = 0, seed: int | None = None,
                 inpaint: bool = False, inpaint_beta: float | None = None):
        if action_horizon < 1:
            raise ValueError(f"action_horizon (actions executed per chunk) must be >= 1, got {action_horizon}")
        if not 0 <= prefetch_steps <= action_horizon:
            raise ValueError(f"prefetch_steps must be in [0, action_horizon={action_horizon}], got {prefetch_steps}: "
                             "the next chunk is requested during the current one")
        self.policy = policy
        self.execute, self.prefetch, self.inpaint = int(action_horizon), int(prefetch_steps), bool(inpaint)
        self.inpaint_beta = inpaint_beta
        horizon = self._server_horizon()
        if horizon is not None:
            self._check_fits(horizon)
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pirl-chunk-prefetch")
                      if self.prefetch else None)
        self._pending: concurrent.futures.Future | None = None
        self.seed = seed
        self.reset()

    def _server_horizon(self) -> int | None:
        metadata = getattr(self.policy, "get_server_metadata", lambda: {})() or {}
        horizon = metadata.get("action_horizon")
        return int(horizon) if horizon is not None else None

    def _check_fits(self, horizon: int) -> None:
        if self.execute + self.prefetch > horizon:
            raise ValueError(f"action_horizon {self.execute} + prefetch_steps {self.prefetch} > the policy's chunk of "
                             f"{horizon} actions: a prefetched chunk starts at index prefetch_steps")

    def reset(self, seed: int | None = None) -> None:
        """A new episode: the next `infer` requests a chunk at once. A prefetch still in flight is waited for
        and discarded (its answer belongs to the last episode, and the connection carries one request at a
        time). `seed` replaces the constructor's for the episodes that follow."""
        self._discard_pending()
        if seed is not None:
            self.seed = seed
        self._chunk: dict | None = None
        self._start = self._used = 0
        self._chunk_index = -1
        self._next_index = 0
        self.stats = {"chunks": 0, "prefetched": 0, "stalls": 0, "stall_s": 0.0}

    def _discard_pending(self) -> None:
        """Waits for the prefetch in flight and drops its answer; a failure is logged, since no tick will
        ever raise it (the episode it was for is over)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        err = pending.exception()
        if err is not None:
            log.warning("a discarded prefetch had failed: %s", err)

    def _remaining(self) -> np.ndarray | None:
        """With `inpaint`: the current chunk's actions from this step on (None before the first chunk, or
        when none are left)."""
        if not self.inpaint or self._chunk is None:
            return None
        rest = np.asarray(self._chunk["actions"])[self._start + self._used:]
        return rest if len(rest) else None

    def _request(self, obs: dict, remaining: np.ndarray | None, delay: int) -> dict:
        request = dict(obs)
        if self.seed is not None:
            request["seed"], request["noise_index"] = int(self.seed), self._next_index
        if remaining is not None:
            request["prev_actions"], request["prev_delay"] = remaining, min(delay, len(remaining))
            if self.inpaint_beta is not None:
                request["prev_beta"] = float(self.inpaint_beta)
        self._next_index += 1
        result = self.policy.infer(request)
        horizon = np.asarray(result["actions"]).shape[0]
        self._check_fits(horizon)
        return result

    def _install(self, result: dict, start: int) -> None:
        self._chunk, self._start, self._used = result, start, 0
        self._chunk_index += 1
        self.stats["chunks"] += 1

    def infer(self, obs: dict) -> dict:
        """This control step's action (and the chunk's other fields), from the observation of this step."""
        if self._chunk is None or self._used == self.execute:
            if self._pending is None:  # the first chunk of an episode, or synchronous brokering
                self._install(self._request(obs, self._remaining(), 0), 0)
            else:
                pending, self._pending = self._pending, None
                waited = not pending.done()
                t0 = time.perf_counter()
                result = pending.result()  # a failed prefetch raises here, at the step that needed it
                if waited:
                    self.stats["stalls"] += 1
                    self.stats["stall_s"] += time.perf_counter() - t0
                self.stats["prefetched"] += 1
                self._install(result, self.prefetch)
        if self.prefetch and self._used == self.execute - self.prefetch:
            self._pending = self._pool.submit(self._request, obs, self._remaining(), self.prefetch)
        step = self._start + self._used
        self._used += 1
        out: dict[str, Any] = {k: v for k, v in self._chunk.items() if k != "actions"}
        out.update(actions=np.asarray(self._chunk["actions"])[step], chunk_index=self._chunk_index, chunk_step=step)
        return out

    def close(self) -> None:
        """Waits for a prefetch in flight; the wrapped policy stays open (its owner closes it)."""
        self._discard_pending()
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> "ActionChunkBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ActionChunkBroker"]
