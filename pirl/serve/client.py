"""Clients of a served policy: openpi's interface, and a `pirl eval` actor.

    client = WebsocketClientPolicy("127.0.0.1", 8000, api_key=None)   # or WebsocketClientPolicy("ws://host:port")
    client.get_server_metadata()          # the metadata frame the server sent on connect
    client.infer(obs)["actions"]          # float32 [H, D], the robot's raw units

Same constructor and methods as `openpi_client.websocket_client_policy.WebsocketClientPolicy`, so either
client works against either server. Errors come back as `ServerError` (a RuntimeError, as openpi raises);
`ServerBusy` when the server's queue is full (retry later).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import time

import numpy as np
import websockets.sync.client

from pirl.serve.protocol import packb, parse_error, unpackb

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server answered an error frame; `code` is one of pirl.serve.protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(f"policy server error [{code}]: {message}")
        self.code, self.message = code, message


class ServerBusy(ServerError):
    """The server's queue is full; the request was not run. Retry after a short pause."""


# websockets >= 16 warns unless a direct (non context-managed) sync connection asks for legacy=True.
_CONNECT_KW = {"legacy": True} if "legacy" in inspect.signature(websockets.sync.client.connect).parameters else {}


def connect(uri: str, **kwargs):
    """A plain synchronous websocket connection (no compression, no proxy unless given)."""
    kwargs.setdefault("proxy", None)
    return websockets.sync.client.connect(uri, compression=None, **_CONNECT_KW, **kwargs)


def _uri(host: str, port: int | None) -> str:
    uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
    return f"{uri}:{port}" if port is not None else uri


class WebsocketClientPolicy:
    """openpi-compatible synchronous client (one connection, one request at a time).

    wait_s: keep retrying a refused connection this long (openpi waits forever; None does too).
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
                 wait_s: float | None = 30.0, timeout_s: float | None = None, max_message_mb: float = 64.0):
        self._uri = _uri(host, port)
        self._api_key = api_key
        self._timeout = timeout_s
        self._max_size = int(max_message_mb * 2**20)
        self._ws, self._metadata = self._connect(wait_s)

    def _connect(self, wait_s: float | None):
        headers = {"Authorization": f"Api-Key {self._api_key}"} if self._api_key else None
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                ws = connect(self._uri, max_size=self._max_size, additional_headers=headers)
                return ws, unpackb(ws.recv(timeout=self._timeout))
            except OSError as err:  # refused / unreachable: the server may still be starting
                if deadline is not None and time.monotonic() > deadline:
                    raise ConnectionError(f"no policy server at {self._uri}: {err}") from err
                log.info("waiting for the policy server at %s ...", self._uri)
                time.sleep(0.5)

    def get_server_metadata(self) -> dict:
        return self._metadata

    def infer(self, obs: dict) -> dict:
        self._ws.send(packb(obs))
        reply = self._ws.recv(timeout=self._timeout)
        if isinstance(reply, str):
            code, message = parse_error(reply)
            raise (ServerBusy if code == "busy" else ServerError)(code, message)
        return unpackb(reply)

    def reset(self) -> None:
        """openpi's client interface; the server keeps no per-episode state, so there is nothing to reset."""

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "WebsocketClientPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteActor:
    """`pirl.train.rl_core.evaluate`'s actor against a served policy: the env loop stays local, actions
    come from the server. Env i's request for chunk k carries {"seed": its episode seed, "noise_index": k},
    the noise the local `PolicyActor` draws, so remote and local evaluation act identically. The B envs'
    requests go out concurrently over one connection each, and the server batches them.

    Requests use pirl's layout (the env's observation row: {"images": {cam: ...}, "state", "prompt"}), so the
    server must run with inputs=pirl (its default).
    """

    def __init__(self, url: str, api_key: str | None = None, num_envs: int = 1, wait_s: float = 30.0,
                 retries_when_busy: int = 100):
        self.url, self.api_key = url, api_key
        self.clients = [WebsocketClientPolicy(url, api_key=api_key, wait_s=wait_s) for _ in range(num_envs)]
        self.metadata = self.clients[0].get_server_metadata()
        if self.metadata.get("inputs", {}).get("preset") not in ("pirl", "custom"):
            raise ValueError(f"{url} serves the {self.metadata['inputs']['preset']!r} request layout; "
                             "remote evaluation sends pirl's observation rows (serve with inputs=pirl)")
        self.retries_when_busy = retries_when_busy
        self.pool = concurrent.futures.ThreadPoolExecutor(num_envs, thread_name_prefix="pirl-remote-actor")
        self.seeds: list[int] = []
        self.index = 0

    def reset(self, seeds: list[int]) -> None:
        if len(seeds) > len(self.clients):
            raise ValueError(f"{len(seeds)} envs but {len(self.clients)} connections")
        self.seeds, self.index = [int(s) for s in seeds], 0

    def _one(self, i: int, obs: dict, remaining: np.ndarray | None, delay: int, beta: float | None) -> np.ndarray:
        request = {"images": {c: v[i] for c, v in obs["images"].items()}, "state": np.asarray(obs["state"][i]),
                   "prompt": obs["prompt"][i], "seed": self.seeds[i], "noise_index": self.index}
        if remaining is not None:
            request.update(prev_actions=np.asarray(remaining[i], np.float32), prev_delay=int(delay))
            if beta is not None:
                request["prev_beta"] = float(beta)
        for attempt in range(self.retries_when_busy + 1):
            try:
                return np.asarray(self.clients[i].infer(request)["actions"])
            except ServerBusy:
                if attempt == self.retries_when_busy:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def __call__(self, obs: dict, remaining: np.ndarray | None = None, delay: int = 0, beta: float | None = None
                 ) -> np.ndarray:
        """As `PolicyActor.__call__`: `remaining` asks the server for real-time chunking."""
        rows = list(self.pool.map(lambda i: self._one(i, obs, remaining, delay, beta), range(len(self.seeds))))
        self.index += 1
        return np.stack(rows)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.pool.shutdown()


def wait_for_health(url: str, timeout_s: float = 60.0) -> bool:
    """Poll GET /healthz of ws://host:port until it answers 200 (True) or the timeout passes (False)."""
    import http.client
    from urllib.parse import urlparse

    parts = urlparse(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return True
        except OSError:
            pass  # not listening yet: try again until the deadline
        time.sleep(0.2)
    return False


__all__ = ["WebsocketClientPolicy", "RemoteActor", "ServerError", "ServerBusy", "wait_for_health"]
