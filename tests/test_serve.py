"""The policy server against a real websocket server on localhost (docs/serve.md).

Served actions equal the local policy's bit for bit for the same seed, alone or batched with other
requests; remote `pirl eval` equals local eval; malformed frames get clear errors and never disturb
other clients; overload answers busy; API key; graceful SIGTERM.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pirl.serve.client import ServerBusy, ServerError, WebsocketClientPolicy, connect, wait_for_health
from pirl.serve.config import ServeConfig
from pirl.serve.policy import ServedPolicy
from pirl.serve.protocol import DecodeError, packb, parse_error, unpackb
from pirl.serve.server import ServerThread
from pirl.train.common import load_bundle
from pirl.train.rl_core import PolicyActor, seeded_noise, seeded_noise_stream
from vla.checkpoint import read_rollout

REPO = Path(__file__).resolve().parents[1]
CKPT = str(REPO / "assets" / "pickcube_tiny_sft_v3")
PROMPT = "pick up the red cube and lift it"
STATE_DIM = 42


@pytest.fixture(scope="module")
def local():
    """The reference: the same checkpoint loaded separately, acting in this process."""
    policy, processor = load_bundle(CKPT)
    policy.eval()
    return PolicyActor(policy, processor, num_steps=4)


# float32 kernels may round differently with the batch size on some CPUs (seen: an AMD EPYC gives a row
# computed alone and the same row inside a batch of 6 up to 2.5e-6 apart; earlier machines gave 0). The
# same batch composition is bit-exact; across compositions a row must agree to this (actions of
# different seeds differ by ~1e-1).
ACROSS_BATCHES = dict(rtol=0.0, atol=2e-5)


def local_actions(actor: PolicyActor, states: np.ndarray, seeds, indices=None, images=None) -> np.ndarray:
    """Local actions [B, H, d] of a batch of rows with the noise a served request with that seed gets."""
    cfg = actor.policy.config
    indices = indices if indices is not None else [0] * len(seeds)
    noise = torch.stack([seeded_noise(s, k, cfg.action_horizon, cfg.action_dim) for s, k in zip(seeds, indices)])
    obs = {"images": images or {}, "state": states, "prompt": [PROMPT] * len(states)}
    return actor.actions(obs, noise)


@pytest.fixture(scope="module")
def server():
    cfg = ServeConfig(checkpoint=CKPT, port=0, num_steps=4, max_batch=16, max_wait_ms=5.0, max_message_mb=1.0,
                      max_image_side=256)
    with ServerThread(ServedPolicy.from_config(cfg), cfg) as st:
        yield st


def request(state, seed=None, index=None, **extra):
    req = {"state": np.asarray(state, np.float32), "prompt": PROMPT, **extra}
    if seed is not None:
        req["seed"] = seed
    if index is not None:
        req["noise_index"] = index
    return req


def states(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, STATE_DIM)).astype(np.float32)


# -- wire format -----------------------------------------------------------------------------------
def test_codec_is_openpis_encoding_and_refuses_unsafe_arrays():
    import msgpack

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(packb({"a": x}), raw=False, strict_map_key=False)["a"]
    assert raw[b"__ndarray__"] is True and raw[b"dtype"] == "<f4" and list(raw[b"shape"]) == [2, 3]
    assert raw[b"data"] == x.tobytes()
    back = unpackb(packb({"a": x, "s": np.float32(2.5), "p": "hi"}))
    assert np.array_equal(back["a"], x) and back["s"] == np.float32(2.5) and back["p"] == "hi"
    evil = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}
    with pytest.raises(DecodeError, match="refused"):
        unpackb(msgpack.packb(evil))
    short = {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}
    with pytest.raises(DecodeError, match="needs 8 bytes, got 7"):
        unpackb(msgpack.packb(short))
    with pytest.raises(DecodeError, match="not valid msgpack"):
        unpackb(b"\xc1\xc1")
    assert parse_error("pirl-serve error [busy]: queue full") == ("busy", "queue full")


# -- the served policy equals the local one ---------------------------------------------------------
def test_metadata_and_health(server):
    with WebsocketClientPolicy(server.url) as client:
        meta = client.get_server_metadata()
    assert meta["action_horizon"] == 10 and meta["action_dim"] == 7 and meta["num_steps"] == 4
    assert meta["model"]["variant"] == "pi0" and meta["inputs"]["state"] == {"key": "state", "dtype": "float32",
                                                                             "shape": [STATE_DIM]}
    assert meta["inputs"]["cameras"] == {} and meta["guidance"] is None
    assert server.server._prepare_inline  # no images: validated on the event loop, no thread hop
    assert meta["rollout"] == {**read_rollout(CKPT), "num_steps": 4}  # remote eval's defaults (the served K)
    documented = (REPO / "docs" / "serve.md").read_text().split("### Metadata")[1].split("###")[0]
    assert [k for k in meta if f"`{k}`" not in documented] == []
    assert wait_for_health(server.url, timeout_s=5)
    conn = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"OK\n"


def test_stats_report_the_answers_latency_percentiles():
    """/stats' `recent` section summarises exactly the server_timing the clients received."""
    cfg = ServeConfig(checkpoint=CKPT, port=0, num_steps=4, max_batch=4, max_wait_ms=1.0)

    def get_stats(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())

    with ServerThread(ServedPolicy.from_config(cfg), cfg) as st:
        assert get_stats(st.server.port)["recent"] == {"answers": 0}
        with WebsocketClientPolicy(st.url) as client:
            timings = [client.infer(request(x, seed=i))["server_timing"] for i, x in enumerate(states(9, seed=2))]
            with pytest.raises(ServerError):  # an error is counted, not timed
                client.infer({"prompt": PROMPT})
        stats = get_stats(st.server.port)
    recent = stats["recent"]
    assert recent["answers"] == 9 and stats["answered"] == 9 and stats["errors"] == 1
    for key in ("total_ms", "queue_ms", "infer_ms", "decode_ms"):
        values = [t[key] for t in timings]
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        assert recent[key] == {"p50": p50, "p90": p90, "p99": p99, "max": max(values)}
    assert recent["total_ms"]["p50"] >= recent["infer_ms"]["p50"] > 0
    assert recent["mean_batch_size"] == 1.0  # one client, one request at a time


def test_served_actions_equal_local_exactly(server, local):
    s = states(6, seed=1)
    seeds, indices = [11, 12, 13, 14, 15, 2**62 + 5], [0, 0, 3, 0, 7, 1]
    # one request at a time is a server batch of one: the local rows, each alone, bit for bit
    expected = np.stack([local_actions(local, s[i:i + 1], seeds[i:i + 1], indices[i:i + 1])[0] for i in range(6)])
    with WebsocketClientPolicy(server.url) as client:
        for i in range(6):
            out = client.infer(request(s[i], seeds[i], indices[i]))
            assert out["actions"].dtype == np.float32 and out["actions"].shape == (10, 7)
            np.testing.assert_array_equal(out["actions"], expected[i])
            assert out["seed"] == seeds[i] and out["noise_index"] == indices[i]
            assert {"infer_ms", "queue_ms", "batch_size"} <= set(out["server_timing"]) and "infer_ms" in out["policy_timing"]
        # each row alone (batch of one) and inside a local batch agree: the batch does not leak into a row
        batched = local_actions(local, s, seeds, indices)
        np.testing.assert_allclose(batched, expected, **ACROSS_BATCHES)
        # no seed: the server draws one and returns it, so the request can be replayed exactly
        first = client.infer(request(s[0]))
        again = client.infer(request(s[0], first["seed"]))
        np.testing.assert_array_equal(first["actions"], again["actions"])


def test_images_processed_per_request_equal_batched_local(local):
    """Rows with camera images of different sizes, processed one request at a time by the server and
    batched, equal the local processor + policy on a batch."""
    cfg = ServeConfig(checkpoint=CKPT, num_steps=4, camera_map={"base_0_rgb": "images/base_camera"})
    served = ServedPolicy.from_config(cfg)
    assert not served.prepare_is_cheap  # image resizing stays on the server's prep pool, off the event loop
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, size=(3, 48, 64, 3), dtype=np.uint8)
    s = states(3, seed=4)
    rows = [served.prepare({"images": {"base_camera": imgs[i]}, "state": s[i], "prompt": PROMPT, "seed": 40 + i})
            for i in range(3)]
    got, _ = served.infer(rows)
    actor = PolicyActor(local.policy, type(local.processor)(local.policy.config, local.processor.tokenizer,
                                                            local.processor.norm_stats,
                                                            camera_map={"base_0_rgb": "base_camera"}), 4)
    expected = local_actions(actor, s, [40, 41, 42], images={"base_camera": imgs})
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="missing key 'images/base_camera'"):
        served.prepare({"state": s[0], "prompt": PROMPT})


def test_16_clients_x_50_requests_each_get_their_own_actions(server, local):
    n_clients, n_requests = 16, 50
    all_states = states(n_clients * n_requests, seed=7).reshape(n_requests, n_clients, STATE_DIM)
    seed_of = lambda j, c: 1000 * c + j  # noqa: E731
    expected = np.stack([local_actions(local, all_states[j], [seed_of(j, c) for c in range(n_clients)])
                         for j in range(n_requests)])  # [requests, clients, H, d]
    before = server.server.stats.batches, server.server.stats.batched_rows
    barrier = threading.Barrier(n_clients)

    def client_loop(c):
        with WebsocketClientPolicy(server.url) as client:
            barrier.wait()
            return [client.infer(request(all_states[j, c], seed_of(j, c)))["actions"] for j in range(n_requests)]

    with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(client_loop, range(n_clients)))
    for c in range(n_clients):
        for j in range(n_requests):
            np.testing.assert_allclose(results[c][j], expected[j, c], err_msg=f"client {c} request {j}",
                                       **ACROSS_BATCHES)  # the server's batches are whatever arrived together
    batches = server.server.stats.batches - before[0]
    rows = server.server.stats.batched_rows - before[1]
    assert rows == n_clients * n_requests
    assert rows / batches > 2, f"dynamic batching barely batched: {rows} rows in {batches} batches"


# -- malformed input never disturbs other clients --------------------------------------------------
def raw_connection(url):
    ws = connect(url, max_size=None)
    unpackb(ws.recv(timeout=10))  # metadata
    return ws


def ask(ws, frame):
    ws.send(frame)
    return ws.recv(timeout=30)


@pytest.mark.parametrize("frame, needle", [
    (b"\xc1\xc1garbage", "not valid msgpack"),
    ("a text frame", "expected a binary msgpack frame"),
    (packb([1, 2, 3]), "must be a map"),
    (packb({"prompt": PROMPT}), "missing key 'state'"),
    (packb({"state": np.zeros(STATE_DIM, np.float32)}), "missing key 'prompt'"),
    (packb({"state": np.zeros(STATE_DIM + 1, np.float32), "prompt": PROMPT}), "'state' has shape (43,); expected (42,)"),
    (packb({"state": np.zeros(STATE_DIM, np.int64), "prompt": PROMPT}), "'state' has dtype int64"),
    (packb({"state": np.full(STATE_DIM, np.nan, np.float32), "prompt": PROMPT}), "non-finite values"),
    (packb({"state": np.zeros(STATE_DIM, np.float32), "prompt": 5}), "'prompt' must be a string"),
    (packb({"state": np.zeros(STATE_DIM, np.float32), "prompt": "cube " * 200}), "max_token_len"),
    (packb({"state": np.zeros(STATE_DIM, np.float32), "prompt": PROMPT, "seed": "x"}), "'seed' must be an int"),
    (packb({"state": np.zeros(STATE_DIM, np.float32), "prompt": PROMPT, "seed": -1}), "'seed' = -1 is outside"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_actions": np.zeros((3, 6), np.float32), "prev_delay": 1}),
     "'prev_actions' has shape (3, 6); expected [L, 7] with 1 <= L <= 10"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_actions": np.zeros((11, 7), np.float32), "prev_delay": 1}),
     "1 <= L <= 10"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_actions": np.full((3, 7), np.nan, np.float32), "prev_delay": 1}),
     "'prev_actions' has non-finite values"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_actions": np.zeros((3, 7), np.float32), "prev_delay": 4}),
     "'prev_delay' (int in [0, L = 3]"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_actions": np.zeros((3, 7), np.float32)}), "is missing"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_delay": 2}), "'prev_delay' and 'prev_beta' need 'prev_actions'"),
    (packb({**request(np.zeros(STATE_DIM)), "prev_actions": np.zeros((3, 7), np.float32), "prev_delay": 1,
            "prev_beta": -1.0}), "'prev_beta' must be a number in (0, 100]"),
])
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(server, local, frame, needle):
    ws = raw_connection(server.url)
    reply = ask(ws, frame)
    assert isinstance(reply, str)
    code, message = parse_error(reply)
    assert code == "bad_request" and needle in message, message
    # the same connection stays usable, and another client is answered correctly
    expected = local_actions(local, states(1, seed=9), [99])[0]
    good = unpackb(ask(ws, packb(request(states(1, seed=9)[0], 99))))
    np.testing.assert_array_equal(good["actions"], expected)
    ws.close()
    with WebsocketClientPolicy(server.url) as other:
        np.testing.assert_array_equal(other.infer(request(states(1, seed=9)[0], 99))["actions"], expected)


def test_oversized_frame_and_image_and_disconnect_mid_request(server, local):
    expected = local_actions(local, states(1, seed=9), [99])[0]
    # a frame over max_message_mb (1 MB here) closes that connection with 1009 (message too big)
    ws = raw_connection(server.url)
    ws.send(packb(request(states(1)[0], 1, blob=np.zeros(2 * 2**20, np.uint8))))
    with pytest.raises(ConnectionClosed) as err:
        ws.recv(timeout=10)
    assert err.value.rcvd is not None and err.value.rcvd.code == 1009
    # clients that disconnect right after sending: the server drops or discards their answers
    for _ in range(3):
        ws = raw_connection(server.url)
        ws.send(packb(request(states(1)[0], 5)))
        ws.close()
    with WebsocketClientPolicy(server.url) as other:
        np.testing.assert_array_equal(other.infer(request(states(1, seed=9)[0], 99))["actions"], expected)
    assert server.server._outstanding == 0 or wait_until(lambda: server.server._outstanding == 0)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_oversized_image_is_named():
    cfg = ServeConfig(checkpoint=CKPT, num_steps=4, inputs="maniskill", max_image_side=64)
    served = ServedPolicy.from_config(cfg)  # the state-only checkpoint: the preset keeps no camera ...
    assert served.spec.cameras == {} and served.spec.state_key == "observation/state"
    cfg = ServeConfig(checkpoint=CKPT, num_steps=4, camera_map={"base_0_rgb": "observation/image"}, max_image_side=64)
    served = ServedPolicy.from_config(cfg)  # ... unless asked for one
    big = {"observation/image": np.zeros((65, 40, 3), np.uint8), "state": np.zeros(STATE_DIM, np.float32),
           "prompt": PROMPT}
    with pytest.raises(ValueError, match=r"'observation/image' is 65x40 pixels; each side must be in \[1, 64\]"):
        served.prepare(big)
    with pytest.raises(ValueError, match="'observation/image' has dtype float32"):
        served.prepare({**big, "observation/image": np.zeros((8, 8, 3), np.float32)})


# -- overload, auth, shutdown ------------------------------------------------------------------------
class SlowPolicy:
    """A stand-in policy: 0.3 s per batch, echoes the request's value."""

    metadata = {"server": "test"}

    def prepare(self, request):
        return request["x"]

    def infer(self, rows):
        time.sleep(0.3)
        return np.asarray(rows, np.float32)[:, None], 300.0


def test_full_queue_answers_busy_and_api_key_is_enforced():
    cfg = ServeConfig(checkpoint="-", port=0, max_batch=1, max_queue=1, max_wait_ms=0, api_key="sesame")
    with ServerThread(SlowPolicy(), cfg) as st:
        with pytest.raises(InvalidStatus) as err:
            WebsocketClientPolicy(st.url, wait_s=1)
        assert err.value.response.status_code == 401
        assert wait_for_health(st.url, timeout_s=5)  # health needs no key
        clients = [WebsocketClientPolicy(st.url, api_key="sesame") for _ in range(5)]

        def one(i):
            try:
                return float(clients[i].infer({"x": float(i)})["actions"][0])
            except ServerBusy:
                return "busy"

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            out = list(pool.map(one, range(5)))
        assert "busy" in out, out  # 1 running + 1 queued; the rest are turned away at once
        assert all(o == "busy" or o == i for i, o in enumerate(out)), out
        assert clients[0].infer({"x": 7.0})["actions"][0] == 7.0  # and it serves again
        for c in clients:
            c.close()


def test_sigterm_answers_in_flight_requests_then_exits(tmp_path, local):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pirl.cli", "serve", f"checkpoint={CKPT}", "port=0", f"port_file={port_file}",
         "num_steps=4", "max_batch=4", "max_wait_ms=1500"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(port_file.exists, timeout=120), proc.stdout.read().decode() if proc.poll() else "no port"
        url = "ws://127.0.0.1:{}".format(port_file.read_text().split()[1])
        clients = [WebsocketClientPolicy(url) for _ in range(4)]
        idle = WebsocketClientPolicy(url)  # keeps the batcher waiting for company (max_wait_ms)
        s = states(3, seed=11)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(clients[i].infer, request(s[i], 500 + i)) for i in range(3)]
            time.sleep(0.5)  # the three requests are queued; the batch has not run yet
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        expected = local_actions(local, s, [500, 501, 502])
        for i in range(3):
            np.testing.assert_array_equal(results[i]["actions"], expected[i])
        assert proc.wait(timeout=60) == 0
        with pytest.raises((ConnectionClosed, ServerError)):
            clients[3].infer(request(s[0], 1))
        idle.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- remote evaluation -------------------------------------------------------------------------------
def run_eval(out: Path, *args: str) -> dict:
    from pirl.cli import main

    assert main(["eval", *args, "episodes=4", "num_envs=1", f"seed={EVAL_SEED}", f"output_dir={out}"]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.sim
def test_remote_eval_equals_local_eval(server, tmp_path, capsys):
    """`pirl eval policy=ws://...` runs the same episode loop with a RemoteActor and takes the served
    checkpoint's rollout settings (env, episode length, n_exec, K) as `pirl eval checkpoint=...` takes them
    from rollout.json: with none given, the same per-episode table. One env, so every chunk is a batch of
    one both locally and on the server (ACROSS_BATCHES: other batch compositions can differ in the last
    bits, which 100 simulated steps can turn into a different episode length)."""
    local_result = run_eval(tmp_path / "local", f"checkpoint={CKPT}")
    remote_result = run_eval(tmp_path / "remote", f"policy={server.url}")
    assert f"from {server.url} (the served checkpoint's rollout settings)" in capsys.readouterr().out
    for key in ("task", "num_steps", "n_exec", "max_episode_steps", "defaults_from_checkpoint", "per_episode"):
        assert remote_result[key] == local_result[key], key
    assert (remote_result["num_steps"], remote_result["n_exec"], remote_result["max_episode_steps"]) == (4, 5, 100)
    assert (tmp_path / "remote" / "results.md").read_text() == (tmp_path / "local" / "results.md").read_text()
    assert 0 < local_result["successes"] < local_result["episodes"], local_result["per_episode"]


def test_remote_eval_overrides_win_with_a_notice_and_k_is_the_servers(server, capsys):
    """An explicit setting differing from the server's is named once; a different K is an error (the server
    samples). Both stop before any simulator starts (n_exec beyond the served horizon)."""
    from pirl.cli import main

    with pytest.raises(SystemExit):
        main(["eval", f"policy={server.url}", "n_exec=11", "env.max_episode_steps=20"])
    out, err = capsys.readouterr()
    notices = [line for line in out.splitlines() if "differs from" in line]
    assert len(notices) == 1 and "n_exec=11 (recorded 5)" in notices[0], out
    assert "env.max_episode_steps=20 (recorded 100)" in notices[0] and server.url in notices[0]
    assert "n_exec=11 > the served action horizon 10" in err
    with pytest.raises(SystemExit):
        main(["eval", f"policy={server.url}", "num_steps=8"])
    assert "samples with K=4" in capsys.readouterr().err


EVAL_SEED = 0  # seeds 0-3: seed 2 succeeds at K=4, the others fail (a table with both outcomes)


# -- guided serving --------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [{"method": "qgf", "weight": 3.0, "clip": "auto"},
                                      {"method": "best_of_n", "n": 3}])
def test_served_guided_actions_equal_local_guided(tmp_path, local, guidance):
    """`pirl serve guidance=...` runs the same `GuidedSampler` as `pirl eval guidance=...`: for the same
    seed a served guided chunk equals the local guided chunk bit for bit, and differs from the plain one."""
    from pirl.critic.q import ChunkCritic, CriticConfig, save_critic
    from pirl.guidance.actor import GuidedSampler, guidance_config

    policy, processor = local.policy, local.processor
    torch.manual_seed(0)
    critic = ChunkCritic(CriticConfig(feature_dim=policy.config.expert.width, state_dim=STATE_DIM, horizon=5,
                                      action_dims=7))
    save_critic(tmp_path / "critic", critic)
    cfg = ServeConfig(checkpoint=CKPT, port=0, num_steps=4, max_batch=4, max_wait_ms=20.0, guidance=guidance,
                      critic=str(tmp_path / "critic"))
    s, seeds = states(3, seed=7), [21, 22, 23]
    sampler = GuidedSampler(policy, critic, guidance_config(guidance, "zscore"), num_steps=4)
    guided = PolicyActor(policy, processor, 4, sample=sampler)
    cfg_model = policy.config
    generators, noise = [], []
    for seed in seeds:  # what the server does for {"seed": seed, "noise_index": 0}
        g, n = seeded_noise_stream(seed, 0, cfg_model.action_horizon, cfg_model.action_dim)
        noise.append(n)
        generators.append(g)
    expected = guided.actions({"images": {}, "state": s, "prompt": [PROMPT] * 3}, torch.stack(noise), generators)
    plain = local_actions(local, s, seeds)
    assert np.abs(expected - plain).max() > 1e-4  # the guidance changes the actions
    with ServerThread(ServedPolicy.from_config(cfg), cfg) as st, WebsocketClientPolicy(st.url) as client:
        assert client.get_server_metadata()["sampler"] == "guided"
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # batched together on the server
            outs = list(pool.map(lambda i: client_infer(st.url, request(s[i], seeds[i], 0)), range(3)))
    for i in range(3):
        np.testing.assert_allclose(outs[i]["actions"], expected[i], **ACROSS_BATCHES)


def client_infer(url, req):
    with WebsocketClientPolicy(url) as client:
        return client.infer(req)


def test_warm_up_captures_every_batch_size_before_serving():
    """With graphs on (EagerRecorder here: a CUDA graph replay's semantics on the CPU), the warm-up
    captures each batch size's passes; requests then replay them and get the eager server's actions."""
    from vla.graphs import EagerRecorder

    cfg = ServeConfig(checkpoint=CKPT, num_steps=4, camera_map={"base_0_rgb": "images/base_camera"})
    eager, graphed = ServedPolicy.from_config(cfg), ServedPolicy.from_config(cfg)
    graphed.actor.policy.use_cuda_graphs(recorder_factory=EagerRecorder)
    graphed.warm_up(4)
    graphs = graphed.actor.policy.graphs
    captured = graphs.captures
    # a lone request runs as a batch of two (PolicyActor's batch invariance): sizes 2, 3, 4, a prefix and
    # an expert pass each
    assert captured == 6 and {key[0] for key in graphs.calls} == {"prefix", "expert"}
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)
    s = states(3, seed=6)
    reqs = [{"images": {"base_camera": imgs[i]}, "state": s[i], "prompt": PROMPT, "seed": 60 + i} for i in range(3)]
    got, _ = graphed.infer([graphed.prepare(r) for r in reqs])
    want, _ = eager.infer([eager.prepare(r) for r in reqs])
    np.testing.assert_array_equal(got, want)
    assert graphs.captures == captured  # served from the warm-up's graphs


# -- the action-chunk broker (pirl.serve.broker) ------------------------------------------------------
class GatedClient:
    """The real client, except that the requests for the chosen chunk indices wait for `gate` first: a
    prefetch held in flight, so a test can see the control loop go on without it."""

    def __init__(self, url, hold=()):
        self.client, self.hold, self.gate, self.sent = WebsocketClientPolicy(url), set(hold), threading.Event(), []

    def get_server_metadata(self):
        return self.client.get_server_metadata()

    def infer(self, obs):
        self.sent.append(dict(obs))
        if obs.get("noise_index") in self.hold:
            assert self.gate.wait(10), "the test never released the held request"
        return self.client.infer(obs)


def brokered_expectation(url, s, seed, n, d, steps):
    """Step t's action under `ActionChunkBroker(n, prefetch_steps=d)`: chunk k = t // n was requested at
    step r_k (0 for the first chunk, k n - d after) with that step's observation and noise index k, and
    step t executes its action t - r_k."""
    with WebsocketClientPolicy(url) as client:
        chunks = {}
        out = []
        for t in range(steps):
            k = t // n
            r = 0 if k == 0 else k * n - d
            if k not in chunks:
                chunks[k] = client.infer(request(s[r], seed, k))["actions"]
            out.append(chunks[k][t - r])
    return np.stack(out)


@pytest.mark.parametrize("n,d", [(3, 0), (3, 2), (4, 4)])
def test_chunk_broker_executes_each_chunk_from_the_step_it_was_meant_for(server, n, d):
    from pirl.serve.broker import ActionChunkBroker

    steps, seed = 11, 77
    s = states(steps, seed=12)
    expected = brokered_expectation(server.url, s, seed, n, d, steps)
    client = GatedClient(server.url)
    with ActionChunkBroker(client, n, prefetch_steps=d, seed=seed) as broker:
        got = np.stack([broker.infer({"state": s[t], "prompt": PROMPT})["actions"] for t in range(steps)])
    np.testing.assert_array_equal(got, expected)
    assert [o["noise_index"] for o in client.sent] == list(range(len(client.sent)))
    assert broker.stats["chunks"] == -(-steps // n) and broker.stats["prefetched"] == (broker.stats["chunks"] - 1 if d else 0)
    if d == 0:  # openpi's synchronous chunking: replan every n steps from that step's observation
        with WebsocketClientPolicy(server.url) as plain:
            first = [plain.infer(request(s[t], seed, t // n))["actions"][0] for t in range(0, steps, n)]
        np.testing.assert_array_equal(got[::n], np.stack(first))
    else:  # negative control: the prefetched chunks are not the synchronous ones
        assert np.abs(got - brokered_expectation(server.url, s, seed, n, 0, steps)).max() > 1e-3


def test_chunk_broker_keeps_acting_while_the_next_chunk_is_in_flight(server):
    from pirl.serve.broker import ActionChunkBroker

    s = states(6, seed=13)
    client = GatedClient(server.url, hold={1})
    broker = ActionChunkBroker(client, 3, prefetch_steps=2, seed=5)
    first = [broker.infer({"state": s[t], "prompt": PROMPT}) for t in range(3)]  # prefetch sent at step 1
    assert [o["chunk_step"] for o in first] == [0, 1, 2] and {o["chunk_index"] for o in first} == {0}
    assert broker._pending is not None and not broker._pending.done()  # steps 1, 2 ran while it was held
    client.gate.set()
    switched = broker.infer({"state": s[3], "prompt": PROMPT})
    assert (switched["chunk_index"], switched["chunk_step"]) == (1, 2)
    assert client.sent[1]["state"] is s[1] or np.array_equal(client.sent[1]["state"], s[1])
    broker.close()
    client.client.close()


def test_chunk_broker_rejects_chunks_it_cannot_align_and_surfaces_a_failed_prefetch(server, caplog):
    from pirl.serve.broker import ActionChunkBroker

    with WebsocketClientPolicy(server.url) as client:
        with pytest.raises(ValueError, match="action_horizon 9 \\+ prefetch_steps 2 > the policy's chunk of 10"):
            ActionChunkBroker(client, 9, prefetch_steps=2)
        with pytest.raises(ValueError, match="prefetch_steps must be in"):
            ActionChunkBroker(client, 2, prefetch_steps=3)
        s = states(4, seed=14)
        bad = s[1].copy()
        bad[0] = np.nan
        broker = ActionChunkBroker(client, 2, prefetch_steps=1, seed=3)
        broker.infer({"state": s[0], "prompt": PROMPT})
        broker.infer({"state": bad, "prompt": PROMPT})  # the prefetch carries the NaN; this step still acts
        with pytest.raises(ServerError, match="NaN"):
            broker.infer({"state": s[2], "prompt": PROMPT})  # the switch step needed that chunk
        again = broker.infer({"state": s[3], "prompt": PROMPT})  # a fresh request, and serving goes on
        assert again["chunk_step"] == 0 and np.isfinite(again["actions"]).all()
        broker.infer({"state": bad, "prompt": PROMPT})  # its prefetch fails too, but the episode ends first:
        with caplog.at_level("WARNING", logger="pirl.serve.broker"):
            broker.reset(seed=9)  # a new episode: the next chunk is index 0 of the new seed, from this step
        assert "a discarded prefetch had failed" in caplog.text and "NaN" in caplog.text
        fresh = broker.infer({"state": s[0], "prompt": PROMPT})["actions"]
        np.testing.assert_array_equal(fresh, client.infer(request(s[0], 9, 0))["actions"][0])
        broker.close()


class LocalChunkPolicy:
    """openpi's `infer(obs) -> {"actions": [H, d]}` on the local policy, drawing the noise a served request
    with that seed and noise index gets: a robot-side broker's policy without a server in between."""

    def __init__(self, actor: PolicyActor):
        self.actor = actor

    def infer(self, request):
        from pirl.guidance.sampler import Inpainting

        obs = {k: v for k, v in request.items() if k not in ("seed", "noise_index", "prev_actions", "prev_delay")}
        cfg = self.actor.policy.config
        noise = seeded_noise(request["seed"], request["noise_index"], cfg.action_horizon, cfg.action_dim)
        inpainting = None
        self.requests = getattr(self, "requests", 0) + 1
        if "prev_actions" in request:
            self.inpainted = getattr(self, "inpainted", 0) + 1
            inpainting = Inpainting.from_raw(self.actor.processor, [request["prev_actions"]],
                                             [request["prev_delay"]], [request.get("prev_beta", 5.0)])
        return {"actions": self.actor.actions(obs, noise[None], inpainting=inpainting)[0]}


@pytest.mark.sim
@pytest.mark.parametrize("inpaint", [False, True])
def test_prefetched_eval_acts_as_the_chunk_broker_does_on_a_robot(local, inpaint):
    """`evaluate(prefetch_steps=d, inpaint=...)` plays each episode exactly as a control loop stepping the
    simulator one action at a time through `ActionChunkBroker(n_exec, prefetch_steps=d, inpaint=...)`
    (seeded with the episode's seed)."""
    import yaml

    from pirl.serve.broker import ActionChunkBroker
    from pirl.train.rl import make_env
    from pirl.train.rl_core import evaluate

    section = {**yaml.safe_load((REPO / "configs" / "env" / "maniskill_pickcube_state.yaml").read_text()),
               **read_rollout(CKPT)["env"], "envs_per_process": 1}
    seeds, n_exec, d = [EVAL_SEED, EVAL_SEED + 1, EVAL_SEED + 2], 5, 2
    reference = []
    with make_env(section, 1, EVAL_SEED) as env:
        for seed in seeds:
            obs = env.reset(seed)
            policy = LocalChunkPolicy(local)
            with ActionChunkBroker(policy, n_exec, prefetch_steps=d, seed=seed, inpaint=inpaint,
                                   inpaint_beta=2.0 if inpaint else None) as broker:
                while True:
                    action = broker.infer(obs)["actions"]
                    obs, _, terminated, truncated, info = env.step_chunk(action[None, None], 1)
                    if terminated[0] or truncated[0]:
                        reference.append({"seed": seed, "success": bool(info["success_once"][0]),
                                          "return": float(info["episode_return"][0]),
                                          "length": int(info["episode_length"][0])})
                        break
            # every request of an episode but its first carries the old plan (a last prefetch may go unused)
            assert getattr(policy, "inpainted", 0) == (policy.requests - 1 if inpaint else 0)
        got = evaluate(None, None, env, len(seeds), n_exec, 4, EVAL_SEED, actor=local, prefetch_steps=d,
                       inpaint=inpaint, inpaint_beta=2.0)
        other = evaluate(None, None, env, len(seeds), n_exec, 4, EVAL_SEED, actor=local,
                         prefetch_steps=d if inpaint else 0)
    assert got["per_episode"] == reference
    # negative control: acting on 2-step-old observations (with steering: steering) is a different run
    assert [r["return"] for r in other["per_episode"]] != [r["return"] for r in reference]


def test_eval_refuses_a_prefetch_its_chunks_cannot_hold():
    """Both checks stop `pirl eval` with one line before any simulator starts."""
    from pirl.cli import main

    with pytest.raises(SystemExit, match=r"prefetch_steps=6 must be in \[0, n_exec=5\]"):
        main(["eval", f"checkpoint={CKPT}", "prefetch_steps=6"])
    with pytest.raises(SystemExit, match=r"n_exec \+ prefetch_steps <= the chunk's 10 actions"):
        main(["eval", f"checkpoint={CKPT}", "n_exec=8", "prefetch_steps=3"])


def test_served_real_time_chunking_equals_local_and_pulls_the_committed_steps_onto_the_old_plan(server, local):
    """A request with "prev_actions" / "prev_delay" gets the local inpainted chunk bit for bit; its first
    `delay` actions move towards the old plan; a request without them in the same server is unchanged."""
    from pirl.guidance.sampler import Inpainting

    s = states(2, seed=21)
    old_plan = local_actions(local, s[1:2], [5])[0]  # another observation's chunk: far from this one's
    remaining, delay = old_plan[4:], 2
    cfg = local.policy.config
    noise = seeded_noise(31, 0, cfg.action_horizon, cfg.action_dim)[None]
    obs = {"images": {}, "state": s[:1], "prompt": [PROMPT]}
    inpainting = Inpainting.from_raw(local.processor, [remaining], [delay])
    expected = local.actions(obs, noise, inpainting=inpainting)[0]
    gentler = local.actions(obs, noise, inpainting=Inpainting.from_raw(local.processor, [remaining], [delay], [1.0]))[0]
    plain = local.actions(obs, noise)[0]
    with WebsocketClientPolicy(server.url) as client:
        got = client.infer({**request(s[0], 31), "prev_actions": remaining, "prev_delay": delay})["actions"]
        got_gentler = client.infer({**request(s[0], 31), "prev_actions": remaining, "prev_delay": delay,
                                    "prev_beta": 1.0})["actions"]
        again = client.infer(request(s[0], 31))["actions"]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_gentler, gentler)
    np.testing.assert_array_equal(again, plain)
    gap = [np.abs(a[:delay] - remaining[:delay]).mean() for a in (plain, gentler, got)]
    assert gap[0] > gap[1] > gap[2], gap  # the cap sets how hard the chunk is pulled onto the old plan
    before, after = np.abs(plain[:delay] - remaining[:delay]).mean(), np.abs(got[:delay] - remaining[:delay]).mean()
    assert after < 0.6 * before, (before, after)
