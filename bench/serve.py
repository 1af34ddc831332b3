"""Policy server throughput and latency vs concurrent clients, with and without dynamic batching.

    python bench/serve.py [--duration 8] [--clients 1 4 16 64] [--checkpoint assets/pickcube_tiny_sft_v3]
    python bench/serve.py --device cuda --out bench/results/serve_gpu     # on a GPU (bf16, CUDA graphs)
    python bench/serve.py --device cuda --server-args cuda_graphs=false    # ... without CUDA graphs
    python bench/serve.py --robot-loop [--period-ms 5]    # a fixed-rate control loop through ActionChunkBroker

The server runs as `pirl serve` in its own process (as in deployment); clients are asyncio websocket
connections in this process, each in a closed loop (send an observation, wait for the actions, repeat)
with its own seed per request. "one-at-a-time" is the same server with max_batch=1. Writes
bench/results/serve.json and bench/results/serve.md.

`--robot-loop` instead runs one client as a robot would: a control loop at a fixed period that takes one
action per tick from `pirl.serve.broker.ActionChunkBroker`, synchronously and with the next chunk prefetched d
steps ahead, and reports how late after its tick each action was ready (bench/results/serve_robot_loop.*).

Target (issue 17): at 16 clients, batching gives >= 4x the throughput of one-at-a-time serving at a p99
latency <= 2x the single-client latency (single client = batching server, 1 client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_results  # noqa: E402
from pirl.serve.protocol import packb, unpackb  # noqa: E402

RESULTS = REPO / "bench" / "results"
PROMPT = "pick up the red cube and lift it"


def start_server(checkpoint: str, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port_file = Path(tempfile.mkdtemp()) / "port"
    cmd = [sys.executable, "-m", "pirl.cli", "serve", f"checkpoint={checkpoint}", "port=0", f"port_file={port_file}",
           f"max_batch={max_batch}", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")
        time.sleep(0.2)
    return proc, "ws://127.0.0.1:{}".format(port_file.read_text().split()[1])


async def client_loop(url: str, index: int, state_dim: int, stop_at: float, warm_until: float, latencies: list,
                      forwards: list):
    from websockets.asyncio.client import connect

    rng = np.random.default_rng(index)
    async with connect(url, compression=None, max_size=None, proxy=None) as ws:
        meta = unpackb(await ws.recv())
        assert meta["action_horizon"] > 0
        k = 0
        while time.perf_counter() < stop_at:
            req = {"state": rng.normal(size=state_dim).astype(np.float32), "prompt": PROMPT,
                   "seed": index * 1_000_003 + k}
            t0 = time.perf_counter()
            await ws.send(packb(req))
            reply = await ws.recv()
            t1 = time.perf_counter()
            if isinstance(reply, str):
                raise RuntimeError(reply)
            if t0 >= warm_until:
                latencies.append(t1 - t0)
                # the batch's forward pass as the server timed it: what of the latency is the model's
                forwards.append(unpackb(reply)["server_timing"]["infer_ms"])
            k += 1


async def measure(url: str, clients: int, state_dim: int, warmup: float, duration: float) -> dict:
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []
    forwards: list[float] = []
    await asyncio.gather(*(client_loop(url, i, state_dim, stop_at, warm_until, latencies, forwards)
                           for i in range(clients)))
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(lat), "requests_per_s": len(lat) / duration,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()), "forward_p50_ms": float(np.median(forwards))}


def server_stats(url: str) -> dict:
    import http.client
    from urllib.parse import urlparse

    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.request("GET", "/stats")
    return json.loads(conn.getresponse().read())


def robot_loop(url: str, state_dim: int, period: float, steps: int, execute: int, prefetch: int,
               inpaint: bool = False) -> dict:
    """A control loop ticking every `period` s: at each tick one `broker.infer(obs)`; an action is late when it
    is ready a whole period or more after its tick (a real-time controller would have missed that tick)."""
    from pirl.serve.broker import ActionChunkBroker
    from pirl.serve.client import WebsocketClientPolicy

    rng = np.random.default_rng(prefetch)
    with WebsocketClientPolicy(url) as client, ActionChunkBroker(client, execute, prefetch_steps=prefetch,
                                                                seed=0, inpaint=inpaint) as broker:
        broker.infer({"state": np.zeros(state_dim, np.float32), "prompt": PROMPT})  # connection warm
        broker.reset()
        delays, request_ms = [], {}
        tick = time.perf_counter()
        for _ in range(steps):
            while (wait := tick - time.perf_counter()) > 0:
                time.sleep(wait)
            out = broker.infer({"state": rng.normal(size=state_dim).astype(np.float32), "prompt": PROMPT})
            delays.append(time.perf_counter() - tick)
            request_ms[out["chunk_index"]] = out["server_timing"]["total_ms"]
            tick = max(tick + period, time.perf_counter())  # a missed tick is not made up by rushing
        stats = dict(broker.stats)
    ms = np.asarray(delays) * 1000
    return {"execute": execute, "prefetch": prefetch, "inpaint": inpaint, "steps": steps, "period_ms": period * 1000,
            "server_ms_p50": float(np.median(list(request_ms.values()))),
            "late_steps": int((ms >= period * 1000).sum()), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), **stats}


def robot_loop_bench(args) -> int:
    proc, url = start_server(args.checkpoint, args.max_batch,
                             [f"max_wait_ms={args.max_wait_ms}", f"num_steps={args.num_steps}",
                              f"torch_threads={args.torch_threads}", f"device={args.device}", *args.server_args])
    try:
        rows = []
        for d, inpaint in [(d, False) for d in args.prefetch] + [(d, True) for d in args.prefetch if args.inpaint]:
            row = robot_loop(url, args.state_dim, args.period_ms / 1000, args.steps, args.execute, d, inpaint)
            rows.append(row)
            print(f"prefetch {d} inpaint {inpaint}: late {row['late_steps']}/{row['steps']}  p50 {row['p50_ms']:.2f} ms  "
                  f"p99 {row['p99_ms']:.2f} ms  max {row['max_ms']:.2f} ms  stalls {row['stalls']}", flush=True)
        latency = server_stats(url)["recent"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    meta = {"checkpoint": args.checkpoint, "num_steps": args.num_steps, "period_ms": args.period_ms,
            "execute": args.execute, "steps": args.steps, "cpus": os.cpu_count(), "device": args.device,
            "torch_threads": args.torch_threads, "server_recent": latency}
    total = latency["total_ms"]
    lines = ["# A robot's control loop against the policy server: synchronous vs prefetched chunks\n",
             f"`python bench/serve.py --robot-loop` on {args.checkpoint} (K={args.num_steps}), server in its own "
             f"process on {meta['cpus']} shared CPU cores ({args.device}, torch threads {args.torch_threads}); one "
             f"client ticking every {args.period_ms:g} ms for {args.steps} steps, executing {args.execute} actions "
             f"of each chunk through `pirl.serve.broker.ActionChunkBroker`. The server's request latency meanwhile: "
             f"p50 {total['p50']:.1f} ms, p99 {total['p99']:.1f} ms ({total['p99'] / args.period_ms:.1f} periods).\n",
             "`ready after tick`: from the tick to the action in hand; `late`: ready a whole period or more after "
             "its tick (a real-time controller misses that tick). `stalls`: switch steps that waited for a "
             "prefetched chunk, and how long in all. A prefetched chunk acts on an observation `prefetch` periods "
             "old. An episode's first step always waits for a whole request: there is no earlier observation to "
             "prefetch from. `inpaint`: requests carry the current chunk's remaining actions and the server "
             "steers the new chunk onto them (real-time chunking: one backward through the expert per denoising "
             "step); `server ms`: the median request as the server timed it.\n",
             "| prefetch steps | inpaint | server ms | late steps | ready after tick p50 ms | p99 ms | max ms | chunks | "
             "stalls (ms in all) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prefetch']}{' (openpi: synchronous)' if r['prefetch'] == 0 else ''} | "
                     f"{'yes' if r['inpaint'] else 'no'} | {r['server_ms_p50']:.1f} | "
                     f"{r['late_steps']} / {r['steps']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | "
                     f"{r['chunks']} | {r['stalls']} ({r['stall_s'] * 1000:.0f}) |")
    return write_results(args.out, {"meta": meta, "rows": rows}, lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/pickcube_tiny_sft_v3")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--state-dim", type=int, default=42)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the server's torch intra-op threads (a batch of 16 can use a second core; one row cannot)")
    p.add_argument("--device", default="cpu", help="the server's device (cuda: bf16, CUDA graphs unless turned off)")
    p.add_argument("--server-args", nargs="*", default=[], help="more `pirl serve` overrides, e.g. cuda_graphs=false")
    p.add_argument("--critic", default=None, help="also serve QGF-guided (guidance=qgf critic=DIR)")
    p.add_argument("--qgf-weight", type=float, default=10.0, help="the guidance weight chosen by bench/guidance.py")
    p.add_argument("--out", default=None, help="output stem (default bench/results/serve or serve_robot_loop)")
    p.add_argument("--robot-loop", action="store_true", help="the control-loop measurement instead (one client)")
    p.add_argument("--period-ms", type=float, default=5.0, help="--robot-loop: the control period")
    p.add_argument("--steps", type=int, default=400, help="--robot-loop: control steps per setting")
    p.add_argument("--execute", type=int, default=5, help="--robot-loop: actions executed per chunk")
    p.add_argument("--prefetch", type=int, nargs="+", default=[0, 2, 4], help="--robot-loop: prefetch steps")
    p.add_argument("--inpaint", action="store_true", help="--robot-loop: each prefetch also with real-time chunking")
    args = p.parse_args()
    if args.robot_loop:
        args.out = args.out or str(RESULTS / "serve_robot_loop")
        return robot_loop_bench(args)
    args.out = args.out or str(RESULTS / "serve")

    rows = []
    plain, guided = ("ode (plain)", []), (f"qgf w={args.qgf_weight:g}",
                                          ["guidance=qgf", f"guidance.weight={args.qgf_weight}", f"critic={args.critic}"])
    modes = [("batching", args.max_batch, plain), ("one-at-a-time", 1, plain)]
    if args.critic:
        modes += [("batching", args.max_batch, guided), ("one-at-a-time", 1, guided)]
    for mode, max_batch, (sampler, overrides) in modes:
        proc, url = start_server(args.checkpoint, max_batch,
                                 [f"max_wait_ms={args.max_wait_ms}", f"num_steps={args.num_steps}",
                                  f"torch_threads={args.torch_threads}", f"device={args.device}", *args.server_args,
                                  *overrides])
        try:
            for n in args.clients:
                before = server_stats(url)
                row = asyncio.run(measure(url, n, args.state_dim, args.warmup, args.duration))
                after = server_stats(url)
                batches = after["batches"] - before["batches"]
                row.update(mode=mode, max_batch=max_batch, sampler=sampler,
                           mean_batch=(after["batched_rows"] - before["batched_rows"]) / max(batches, 1))
                rows.append(row)
                print(f"{sampler:12s} {mode:14s} clients {n:3d}: {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                      f"p99 {row['p99_ms']:7.1f} ms  forward p50 {row['forward_p50_ms']:6.1f} ms  mean batch {row['mean_batch']:.1f}",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def get(mode, n, sampler="ode (plain)"):
        return next((r for r in rows if r["mode"] == mode and r["clients"] == n and r["sampler"] == sampler), None)

    single, b16, o16 = get("batching", 1), get("batching", 16), get("one-at-a-time", 16)
    target = None
    if single and b16 and o16:
        speedup = b16["requests_per_s"] / o16["requests_per_s"]
        p99_ratio = b16["p99_ms"] / single["p50_ms"]
        target = {"speedup_16_clients": speedup, "p99_16_over_single_latency": p99_ratio,
                  "p99_16_over_single_p99": b16["p99_ms"] / single["p99_ms"],
                  "single_client_latency_ms": single["p50_ms"], "forward_16_ms": b16["forward_p50_ms"],
                  "met": bool(speedup >= 4 and p99_ratio <= 2),
                  "rule": ">= 4x throughput of one-at-a-time at 16 clients, p99 <= 2x the single-client latency "
                          "(its p50)"}
    meta = {"checkpoint": args.checkpoint, "num_steps": args.num_steps, "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms, "duration_s": args.duration, "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch_threads": args.torch_threads,
            "load_avg_at_end": os.getloadavg(),
            "critic": args.critic, "device": args.device, "server_args": args.server_args}
    if args.device.startswith("cuda"):
        import torch

        meta["device_name"] = torch.cuda.get_device_name(0)
    where = (f"on {meta['device_name']} ({' '.join(args.server_args) or 'CUDA graphs on'}), {meta['cpus']} CPU cores"
             if "device_name" in meta else f"{meta['cpus']} shared CPU cores")
    lines = [f"# Policy server: throughput and latency vs concurrent clients\n",
             f"`python bench/serve.py` on {args.checkpoint} (K={args.num_steps}), server in its own process "
             f"(torch threads {args.torch_threads}), {where}, asyncio clients in closed loop, "
             f"{args.duration:.0f} s per point after {args.warmup:.0f} s warm-up; batching = max_batch "
             f"{args.max_batch}, max_wait {args.max_wait_ms} ms. Load average at the end: "
             f"{meta['load_avg_at_end'][0]:.1f}.\n",
             "`forward ms`: the median forward pass of the batch a request ran in, as the server timed it "
             "(`server_timing.infer_ms`); the rest of the latency is queueing and transport.\n",
             "| sampler | mode | clients | req/s | p50 ms | p99 ms | forward ms | mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['mode']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['forward_p50_ms']:.1f} | {r['mean_batch']:.1f} |")
    if target:
        lines.append(f"\nTarget at 16 clients: throughput {target['speedup_16_clients']:.2f}x one-at-a-time (>= 4x), "
                     f"p99 {target['p99_16_over_single_latency']:.2f}x the single-client latency "
                     f"{target['single_client_latency_ms']:.1f} ms (<= 2x): **{'met' if target['met'] else 'not met'}** "
                     f"(p99 over the single client's p99: {target['p99_16_over_single_p99']:.2f}x). The batch-of-16 "
                     f"forward alone takes {b16['forward_p50_ms']:.1f} ms = "
                     f"{b16['forward_p50_ms'] / single['p50_ms']:.2f}x the single-client latency: with 16 closed-loop "
                     f"clients every request waits at least one such forward.")
    if args.critic:
        g1, g16, go16 = get("batching", 1, guided[0]), get("batching", 16, guided[0]), get("one-at-a-time", 16, guided[0])
        if g1 and g16 and go16:
            lines.append(f"\nQGF-guided ({guided[0]}, critic {args.critic}): batching gives "
                         f"{g16['requests_per_s'] / go16['requests_per_s']:.2f}x one-at-a-time at 16 clients; "
                         f"single-client latency {g1['p50_ms']:.1f} ms ({g1['p50_ms'] / single['p50_ms']:.2f}x plain).")
    return write_results(args.out, {"meta": meta, "target": target, "rows": rows}, lines)


if __name__ == "__main__":
    sys.exit(main())
