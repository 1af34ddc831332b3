"""The websocket policy server: openpi's protocol (`pirl.serve.protocol`) with dynamic batching.

    connection handler (one per client, asyncio)     batcher (one task)               model thread (one)
    recv -> decode -> validate + process (prep pool*) collect <= max_batch requests,   ServedPolicy.infer:
         -> queue (bounded: full = "busy")            wait <= max_wait_ms for more     one forward pass
         <- await own result -> send                  while clients are still idle     for the batch
    * on the event loop itself when requests carry no images (`prepare_is_cheap`): the thread round trip
      costs more than the ~50 us of work.

- A bad frame gets a text error frame for that client only; the connection stays open (the client may fix
  and resend); other clients are never affected. A frame over max_message_mb closes that connection with
  1009. A batch that fails inside the model answers its requests with `internal` and the server goes on.
- The batcher stops waiting as soon as every connected client has a request queued or running (nobody
  else can send), so a lone client pays no batching delay.
- SIGTERM / SIGINT: stop accepting connections, answer new requests `shutting_down`, answer everything
  already queued or running, then close connections with 1001 and exit (within shutdown_timeout_s).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import http
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from pirl.serve.config import ServeConfig
from pirl.serve.inputs import RequestError
from pirl.serve.protocol import DecodeError, error_text, packb, unpackb
from vla.checkpoint import atomic_file

log = logging.getLogger("pirl.serve")

RECENT = 1000  # /stats reports latency percentiles over the last this many answered requests


@dataclasses.dataclass
class _Pending:
    prepared: Any
    future: asyncio.Future
    conn: ServerConnection
    t_queued: float


def latency_summary(timings: list[dict]) -> dict:
    """/stats' `recent` section: p50 / p90 / p99 / max of each `server_timing` field (ms) over the given
    answers, and their mean batch size."""
    if not timings:
        return {"answers": 0}
    out: dict[str, Any] = {"answers": len(timings)}
    for key in ("total_ms", "queue_ms", "infer_ms", "decode_ms"):
        values = np.array([t[key] for t in timings])
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        out[key] = {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(values.max())}
    out["mean_batch_size"] = float(np.mean([t["batch_size"] for t in timings]))
    return out


@dataclasses.dataclass
class Stats:
    requests: int = 0
    answered: int = 0
    errors: int = 0
    busy: int = 0
    batches: int = 0
    batched_rows: int = 0
    connections_total: int = 0


class PolicyServer:
    """Serves `policy` (anything with `.metadata`, `.prepare(request)`, `.infer(rows)`; a `ServedPolicy`)."""

    def __init__(self, policy, cfg: ServeConfig):
        self.policy, self.cfg = policy, cfg
        self.api_key = cfg.api_key or os.environ.get("PIRL_SERVE_API_KEY") or None
        self.stats = Stats()
        self._recent: collections.deque[dict] = collections.deque(maxlen=RECENT)  # answers' server_timing
        self.port: int | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._outstanding = 0  # accepted requests not yet answered (queued, running, or being sent)
        self._connections: set[ServerConnection] = set()
        self._draining = False
        self._model_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pirl-serve-model")
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pirl-serve-prep")
        # Requests without images are validated on the event loop: the thread round trip costs more than the
        # work, and with 16 clients the 16 round trips sit in the gap between two batches.
        self._prepare_inline = bool(getattr(policy, "prepare_is_cheap", False))
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # -- HTTP side: health, stats, auth, connection limit -------------------------------------------
    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?")[0]
        if path == "/healthz":
            if self._draining:
                return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return conn.respond(http.HTTPStatus.OK, "OK\n")
        if path == "/stats":
            body = {**dataclasses.asdict(self.stats), "queued": len(self._pending), "outstanding": self._outstanding,
                    "connections": len(self._connections), "draining": self._draining,
                    "recent": latency_summary(list(self._recent))}
            return conn.respond(http.HTTPStatus.OK, json.dumps(body) + "\n")
        if self._draining:
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
        if self.api_key:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Api-Key {self.api_key}".encode()):
                log.warning("refused %s: missing or wrong API key", conn.remote_address)
                return conn.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key "
                                    "(header Authorization: Api-Key <key>)\n")
        if len(self._connections) >= self.cfg.max_connections:
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                f"too many connections (max_connections={self.cfg.max_connections})\n")
        return None

    # -- one client --------------------------------------------------------------------------------
    async def _handler(self, conn: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        self._connections.add(conn)
        self.stats.connections_total += 1
        log.debug("connection from %s", conn.remote_address)
        prev_total_ms = None
        try:
            await conn.send(packb(self.policy.metadata))
            async for message in conn:
                t0 = time.perf_counter()
                self.stats.requests += 1
                reply, counted = await self._answer(loop, conn, message, t0, prev_total_ms)
                try:
                    await conn.send(reply)
                finally:
                    if counted:  # answered (or the client left): drain may now complete
                        self._outstanding -= 1
                        self._maybe_drained()
                prev_total_ms = (time.perf_counter() - t0) * 1000
        except ConnectionClosed:
            pass  # the client left (also mid-request): its reply is dropped, the other clients go on
        finally:
            self._connections.discard(conn)
            log.debug("connection from %s closed", conn.remote_address)

    def _error(self, code: str, message: str) -> str:
        self.stats.errors += 1
        if code == "busy":
            self.stats.busy += 1
        return error_text(code, message)

    async def _answer(self, loop, conn, message, t0: float, prev_total_ms) -> tuple[bytes | str, bool]:
        """The reply frame, and whether the request was accepted (counted in `_outstanding`)."""
        if self._draining:
            return self._error("shutting_down", "server is shutting down; reconnect to a live server"), False
        if isinstance(message, str):
            return self._error("bad_request", "expected a binary msgpack frame, got a text frame"), False
        try:
            request = unpackb(message)
            if self._prepare_inline:
                prepared = self.policy.prepare(request)
            else:
                prepared = await loop.run_in_executor(self._prep_pool, self.policy.prepare, request)
        except (DecodeError, RequestError) as err:
            return self._error("bad_request", str(err)), False
        except Exception as err:  # a bug in validation must not take the server down
            log.exception("request validation failed")
            return self._error("internal", f"validation failed: {type(err).__name__}: {err}"), False
        t_prepared = time.perf_counter()
        if len(self._pending) >= self.cfg.max_queue:
            return self._error("busy", f"queue full ({self.cfg.max_queue} requests waiting); retry later"), False
        item = _Pending(prepared, loop.create_future(), conn, t_prepared)
        self._pending.append(item)
        self._outstanding += 1
        self._arrived.set()
        try:
            actions, batch_size, infer_ms, t_start = await item.future
        except Exception as err:
            return self._error("internal", f"inference failed: {type(err).__name__}: {err}"), True
        try:
            t_done = time.perf_counter()
            response = {
                "actions": actions,
                "policy_timing": {"infer_ms": infer_ms},
                "server_timing": {"infer_ms": infer_ms, "batch_size": batch_size,
                                  "decode_ms": (t_prepared - t0) * 1000, "queue_ms": (t_start - t_prepared) * 1000,
                                  "total_ms": (t_done - t0) * 1000},
            }
            for key in ("seed", "noise_index"):  # what makes the request reproducible
                if getattr(prepared, key, None) is not None:
                    response[key] = getattr(prepared, key)
            if prev_total_ms is not None:
                response["server_timing"]["prev_total_ms"] = prev_total_ms
            frame = packb(response)
        except Exception as err:
            log.exception("could not encode a response")
            return self._error("internal", f"could not encode the response: {type(err).__name__}: {err}"), True
        self.stats.answered += 1
        self._recent.append(response["server_timing"])
        return frame, True

    # -- batching ----------------------------------------------------------------------------------
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.cfg.max_wait_ms / 1000
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + max_wait
            # Wait for company only while some connected client has nothing queued (no batch runs now).
            while len(self._pending) < min(self.cfg.max_batch, len(self._connections)):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.cfg.max_batch, len(self._pending)))]
            live = []
            for item in batch:  # a client that left while queued is not computed for
                if item.conn.state is State.OPEN:
                    live.append(item)
                elif not item.future.done():
                    item.future.set_exception(ConnectionError("client disconnected"))
            if not live:
                continue
            t_start = time.perf_counter()
            try:
                actions, infer_ms = await loop.run_in_executor(self._model_pool, self.policy.infer,
                                                               [p.prepared for p in live])
            except Exception as err:
                log.exception("batch of %d failed", len(live))
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self.stats.batches += 1
            self.stats.batched_rows += len(live)
            for i, item in enumerate(live):
                if not item.future.done():
                    item.future.set_result((actions[i], len(live), infer_ms, t_start))

    def _maybe_drained(self) -> None:
        if self._draining and self._outstanding == 0 and self._drained is not None:
            self._drained.set()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def serve(self, install_signals: bool = True) -> None:
        """Run until SIGTERM / SIGINT (or `stop()`), then drain and close."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._arrived = asyncio.Event()
        self._drained = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        server = await serve(self._handler, self.cfg.host, self.cfg.port, compression=None,
                             max_size=int(self.cfg.max_message_mb * 2**20), process_request=self._process_request,
                             ping_interval=20, ping_timeout=60)
        self.port = server.sockets[0].getsockname()[1]
        batcher = asyncio.create_task(self._batcher())
        if self.cfg.port_file:
            atomic_file(self.cfg.port_file, lambda p: Path(p).write_text(f"{self.cfg.host} {self.port}\n"))
        log.info("pirl serve: ws://%s:%d  (max_batch %d, max_wait %.1f ms, %s)", self.cfg.host, self.port,
                 self.cfg.max_batch, self.cfg.max_wait_ms, "API key required" if self.api_key else "no API key")
        self._ready.set()
        await self._stop.wait()
        log.info("pirl serve: shutting down; answering %d outstanding request(s)", self._outstanding)
        self._draining = True
        server.close(close_connections=False)  # stop listening; live connections stay for their answers
        if self._outstanding:
            try:
                await asyncio.wait_for(self._drained.wait(), self.cfg.shutdown_timeout_s)
            except TimeoutError:
                log.warning("pirl serve: %d request(s) still outstanding after %.0f s", self._outstanding,
                            self.cfg.shutdown_timeout_s)
        await asyncio.gather(*(c.close(1001, "server shutting down") for c in list(self._connections)),
                             return_exceptions=True)
        batcher.cancel()
        await asyncio.gather(batcher, return_exceptions=True)
        await server.wait_closed()
        self._model_pool.shutdown(wait=True)
        self._prep_pool.shutdown(wait=True)
        log.info("pirl serve: stopped (%d answered, %d errors, %d batches)", self.stats.answered,
                 self.stats.errors, self.stats.batches)

    def stop(self) -> None:
        """Thread-safe: begin a graceful shutdown (as SIGTERM does)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


class ServerThread:
    """A `PolicyServer` on a background thread (tests, benchmarks, notebooks): `with ServerThread(...) as s:`
    then connect to `s.url`."""

    def __init__(self, policy, cfg: ServeConfig):
        self.server = PolicyServer(policy, cfg)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="pirl-serve")

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(install_signals=False))
        except BaseException as err:  # surfaced by start()
            self.error = err
            self.server._ready.set()

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        if not self.server._ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    @property
    def url(self) -> str:
        return f"ws://{self.server.cfg.host}:{self.server.port}"

    def stop(self, timeout: float = 60.0) -> None:
        self.server.stop()
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(cfg: ServeConfig) -> int:
    """`pirl serve`: load the policy, serve until SIGTERM / SIGINT."""
    from pirl.serve.policy import ServedPolicy

    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("PIRL_SERVE_API_KEY")):
        log.warning("pirl serve: binding %s without an API key: anyone who can reach this port can drive the "
                    "robot", cfg.host)
    policy = ServedPolicy.from_config(cfg)
    if policy.actor.policy.graphs is not None:
        seconds = policy.warm_up(cfg.max_batch)
        log.info("pirl serve: CUDA graphs captured for batch sizes 1..%d in %.1f s", cfg.max_batch, seconds)
    asyncio.run(PolicyServer(policy, cfg).serve())
    return 0
