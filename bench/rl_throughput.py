"""Env throughput of the real RL rollout loop, for several worker-process layouts, in one run.

    python bench/rl_throughput.py [--layouts before 1 4 8 16 auto@32 pipe@32] [--rollouts 3] [--num-envs 16] [--quick]

A layout is "before" (one process per env with the worker env as it was before `envs_per_process`:
ManiSkill with autograd bookkeeping, no GC freeze, no kept render context), a value of the env
config's `envs_per_process` with the current code, "auto" (one process per core), or "pipe" (one
process per core with the pipelined rollout, the default of `collect_rollout`: the model computes one
group's chunk while the other group's processes step). All but "pipe" run the unpipelined loop.
"@N" runs it on N envs instead of --num-envs: `before@16 auto@32 pipe@32` compares the main job as
it was (16 envs, one process each), with 32 envs on one process per core, and as it is (pipelined).

The loop is what `pirl train experiment=maniskill_pickcube_tiny` runs per iteration
(rollout_on_worker): `env.reset(seed)`, then `pirl.train.rl_core.collect_rollout`, on that job's
setup pinned here: the start assets/pickcube_tiny_sft_v4_2k (the main job's until v5_2k, the same policy class and size), Flow-SDE with the sampler file's
defaults, 16 PickCube state envs (configs/env/maniskill_pickcube_state.yaml, 100-step episodes,
shaped_diff reward), num_chunks 20, n_exec 5, built as pirl/train/rl.py builds them. All layouts
are alive at once and their rollouts alternate (round r runs every layout once), so a load change
on a shared machine hits them alike; ratios to the first layout are what to read. Rollout r uses
the same env and noise seeds in every layout, so the batches must be identical between layouts of one
env count and loop (the pipelined loop draws its noise per env group, so its batches differ from the
unpipelined loop's); the warm-up rollout has rollout 0's seeds, so each layout's two must be
identical too. The run checks both.

Per chunk it splits the time into the reset, the processor (observations -> model inputs), the model
(prefix, denoising, value), env.step_chunk (pipelined: the waits in begin_chunk / finish_chunk) and
the mean time a worker process spent inside its envs, and the rest of rl_core's loop; and it reads
the CPU seconds the workers used.
Writes bench/results/rl_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLICY = "assets/pickcube_tiny_sft_v4_2k"  # the main job's start


class Timers(dict):
    """Named sums of wall-clock seconds."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = self.get(name, 0.0) + seconds


def timed(fn, timers: Timers, name: str):
    """`fn`, adding its wall-clock time under `name` (wraps the loop's pieces without editing them)."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.add(name, time.perf_counter() - started)
    return wrapper


class TimedProcessor:
    """Delegates to the real processor; times its __call__ (observation -> model inputs)."""

    def __init__(self, processor, timers: Timers):
        self._processor, self._timers = processor, timers

    def __call__(self, *args, **kwargs):
        return timed(self._processor, self._timers, "processor")(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def worker_pids(env) -> list[int]:
    """One pid per worker process of a pool-backed VLAEnv."""
    pool = env.backend.pool
    return [pool.pid(group[0]) for group in pool.groups]


def machine() -> str:
    """CPU model and the cores this process may run on (what the default layout counts)."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:  # no /proc (not Linux): the table still says the architecture and cores
        model = "unknown CPU model"
    cores = len(os.sched_getaffinity(0))
    return f"{platform.machine()} {model}, {cores} cores, CPU only, Python {sys.version.split()[0]}"


class BeforeFactory:
    """The worker env as it was before envs_per_process (what envs.maniskill's factory did): no
    inference mode, no GC freeze, no kept render context; for the baseline layout."""

    def __init__(self, cfg, render_frames: bool):
        self.cfg, self.render_frames = cfg, render_frames

    def __call__(self):
        from envs.maniskill import ManiSkillSingleEnv

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return ManiSkillSingleEnv(self.cfg, self.render_frames)


def make_before_env(section: dict, num_envs: int, seed: int):
    """make_maniskill_env's CPU path with the old worker env and one process per env."""
    from envs.base import PoolBackend, VLAEnv
    from envs.config import ManiSkillConfig
    from envs.workers import SubprocEnvPool
    from pirl.train.rl import env_section

    data = env_section(section, num_envs, seed)
    data.pop("simulator")
    cfg = ManiSkillConfig.from_dict(data)
    factories = [BeforeFactory(cfg.env_task(i), i in cfg.record_video_envs) for i in range(cfg.num_envs)]
    return VLAEnv(PoolBackend(SubprocEnvPool(factories, timeout_s=cfg.worker_timeout_s, envs_per_process=1)), cfg)


class Layout:
    """One env batch with a given envs_per_process, and the sums of its timed rollouts.

    name "before": one process per env with the worker env as it was before this change; an
    integer: envs_per_process with the current code; "auto": one process per core; "pipe": "auto"
    with the pipelined rollout."""

    def __init__(self, spec: str, cfg, default_envs: int):
        from pirl.train.rl import make_env

        self.name, _, envs = spec.partition("@")
        self.num_envs = int(envs) if envs else default_envs
        self.pipelined = self.name == "pipe"
        started = time.perf_counter()
        if self.name == "before":
            self.env = make_before_env(cfg.env, self.num_envs, cfg.run.seed)
        else:
            per_process = None if self.name in ("auto", "pipe") else int(self.name)
            self.env = make_env({**cfg.env, "envs_per_process": per_process}, self.num_envs, cfg.run.seed)
        self.build_s = time.perf_counter() - started
        self.processes = self.env.backend.pool.num_workers
        self.timers = Timers()  # sums over the timed rollouts
        self._step_timer = Timers()  # the loop's waits for the envs: step_chunk, or both chunk halves
        for method in ("begin_chunk", "finish_chunk") if self.pipelined else ("step_chunk",):
            setattr(self.env, method, timed(getattr(self.env, method), self._step_timer, "step_chunk"))
        self.env_steps = self.chunks = 0
        self.rollout_steps_per_s: list[float] = []
        self.collect_steps_per_s: list[float] = []
        self.batches: list = []
        self.warmup_batch = None

    def rollout(self, agent, processor, cfg, seed: int, num_chunks: int, n_exec: int, keep_batch: bool):
        import torch

        from pirl.train import rl_core

        pool = self.env.backend.pool
        timers = Timers()
        cpu0 = [process_cpu_s(p) for p in worker_pids(self.env)]
        step0 = self._step_timer.get("step_chunk", 0.0)
        # collect_rollout looks these up in its module at call time: wrap them there for the run.
        act, value = rl_core.act, rl_core.state_value
        rl_core.act = timed(act, timers, "act")
        rl_core.state_value = timed(value, timers, "bootstrap_value")
        try:
            started = time.perf_counter()
            obs = self.env.reset(seed)  # as rollout_on_worker does: every scene is rebuilt
            timers.add("reset", time.perf_counter() - started)
            busy1, cpu1 = sum(pool.busy_s), [process_cpu_s(p) for p in worker_pids(self.env)]
            batch, _ = rl_core.collect_rollout(agent, TimedProcessor(processor, timers), self.env, obs,
                                               num_chunks, n_exec, cfg.sampler,
                                               torch.Generator().manual_seed(seed), pipeline=self.pipelined)
            total = time.perf_counter() - started
        finally:
            rl_core.act, rl_core.state_value = act, value
        cpu2 = [process_cpu_s(p) for p in worker_pids(self.env)]
        timers.add("total", total)  # reset + collect_rollout, what `pirl train` times
        timers.add("step_chunk", self._step_timer.get("step_chunk", 0.0) - step0)
        timers.add("worker_busy_mean", (sum(pool.busy_s) - busy1) / self.processes)
        timers.add("worker_cpu_reset", sum(cpu1) - sum(cpu0))
        timers.add("worker_cpu", sum(cpu2) - sum(cpu1))
        for name, seconds in timers.items():
            self.timers.add(name, seconds)
        self.env_steps += batch.env_steps
        self.chunks += num_chunks
        self.rollout_steps_per_s.append(batch.env_steps / total)
        self.collect_steps_per_s.append(batch.env_steps / (total - timers["reset"]))
        if keep_batch:
            self.batches.append(batch)
        return batch

    def summary(self) -> dict:
        t = self.timers
        per_chunk = lambda s: round(1000 * s / self.chunks, 1)  # noqa: E731
        policy_calls = t["act"] + t.get("bootstrap_value", 0.0)  # both run the processor
        other = t["total"] - t["reset"] - policy_calls - t["step_chunk"]
        return {
            "layout": self.name,
            "num_envs": self.num_envs,
            "processes": self.processes,
            "env_steps": self.env_steps,
            "seconds": round(t["total"], 2),
            "env_steps_per_s": round(self.env_steps / t["total"], 1),
            "collect_env_steps_per_s": round(self.env_steps / (t["total"] - t["reset"]), 1),
            "rollout_steps_per_s": [round(x, 1) for x in self.rollout_steps_per_s],
            "reset_s_per_rollout": round(t["reset"] / len(self.rollout_steps_per_s), 2),
            "build_s": round(self.build_s, 1),
            "ms_per_chunk": {
                "total": per_chunk(t["total"]),
                "reset": per_chunk(t["reset"]),
                "processor": per_chunk(t.get("processor", 0.0)),
                "model": per_chunk(policy_calls - t.get("processor", 0.0)),
                "step_chunk": per_chunk(t["step_chunk"]),
                "worker_busy_mean": per_chunk(t["worker_busy_mean"]),
                "step_chunk_minus_busy": per_chunk(t["step_chunk"] - t["worker_busy_mean"]),
                "rl_core_other": per_chunk(other),
            },
            "worker_cpu_ms_per_env_step": round(1000 * t["worker_cpu"] / self.env_steps, 2),
            "worker_cpu_s_per_reset": round(t["worker_cpu_reset"] / len(self.rollout_steps_per_s), 2),
        }


def same_batches(a, b) -> bool:
    """Rollouts with the same seeds must not depend on the process layout."""
    import torch

    return all(torch.equal(x, y) for x, y in ((a.rewards, b.rewards), (a.terminated, b.terminated),
                                              (a.truncated, b.truncated), (a.chain.actions, b.chain.actions)))


def layout_label(name: str, num_envs: int | None = None) -> str:
    label = {"before": "before: 1 per process, old worker env", "auto": "one process per core",
             "pipe": "one process per core, pipelined"}.get(name, f"{name} per process")
    return label if num_envs is None else f"{num_envs} envs, {label}"


def to_markdown(rows: list[dict], meta: dict) -> str:
    base, base_collect = rows[0]["env_steps_per_s"], rows[0]["collect_env_steps_per_s"]
    lines = [
        "# RL rollout throughput by worker-process layout",
        "",
        f"{meta['machine']}. {meta['setup']}",
        "",
        meta["note"],
        "",
        "| layout | processes | env steps/s (reset + rollout) | ratio | per rollout | env steps/s (rollout only) |"
        " ratio | reset s | build s | worker CPU ms / env step | worker CPU s / reset |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {layout_label(r['layout'], r['num_envs'])} | {r['processes']} | {r['env_steps_per_s']} |"
                     f" {r['env_steps_per_s'] / base:.2f}x | {', '.join(map(str, r['rollout_steps_per_s']))} |"
                     f" {r['collect_env_steps_per_s']} | {r['collect_env_steps_per_s'] / base_collect:.2f}x |"
                     f" {r['reset_s_per_rollout']} | {r['build_s']} | {r['worker_cpu_ms_per_env_step']} |"
                     f" {r['worker_cpu_s_per_reset']} |")
    keys = list(rows[0]["ms_per_chunk"])
    lines += ["", "Time per chunk (ms, mean over the timed rollouts; the rollout's reset spread over its chunks):", "",
              "| layout | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {layout_label(r['layout'], r['num_envs'])} | " + " | ".join(str(r["ms_per_chunk"][k]) for k in keys) + " |")
    lines += ["", "Env steps/s (reset + rollout) is what `pirl train` logs: `env.reset(seed)` (every scene rebuilt)"
              " and `collect_rollout`. Per chunk: `reset` = that reset; `processor` = observations -> model"
              " inputs; `model` = prefix, denoising and value head (the chunk's sample, and V of truncated"
              " envs' final obs); `step_chunk` = the env call; `worker_busy_mean` = time a worker process"
              " spent inside its envs (simulator steps and auto-resets), mean over processes;"
              " `step_chunk_minus_busy` = waiting for the slowest process, pipes, pickling, stacking"
              " (pipelined: `step_chunk` is the time the loop waited in begin_chunk / finish_chunk while the"
              " processes stepped, so this is negative where the model ran during their steps);"
              " `rl_core_other` = the rest of collect_rollout. Worker CPU ms / env step = CPU seconds of all"
              " worker processes during collect_rollout (auto-resets included) per executed env step; worker"
              " CPU s / reset = theirs during `env.reset(seed)` (one scene rebuild per env).", ""]
    return "\n".join(lines)


def layout_timers_reset(layouts: list[Layout]) -> None:
    """Forget the warm-up rollout: the sums start with the timed ones."""
    for layout in layouts:
        layout.timers = Timers()
        layout.env_steps = layout.chunks = 0
        layout.rollout_steps_per_s = []
        layout.collect_steps_per_s = []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["before", "1", "4", "8", "16", "auto@32", "pipe@32"],
                        help="'before' (the old layout and worker env), envs_per_process values, 'auto'"
                             " (one process per core) or 'pipe' (auto with the pipelined rollout), each"
                             " optionally @N envs; the first is the baseline of the ratios")
    parser.add_argument("--rollouts", type=int, default=3, help="timed rollouts per layout (after one warm-up)")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--num-chunks", type=int, default=20)
    parser.add_argument("--n-exec", type=int, default=5)
    parser.add_argument("--reward-mode", default="shaped_diff", help="env.reward_mode (dense_diff asks"
                        " ManiSkill for its dense reward every step)")
    parser.add_argument("--quick", action="store_true", help="4 chunks, 1 timed rollout (smoke run)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_chunks, args.rollouts = 4, 1

    import torch

    from pirl.cli import compose_train
    from pirl.train.rl import build_agent, processor_for

    torch.set_num_threads(1)
    # Pinned here rather than read from the experiment file, which changes with the recipe: the
    # env is what this bench measures, and the policy is the shipped one.
    cfg = compose_train(["env=maniskill_pickcube_state", "sampler=flow_sde", f"run.init_checkpoint={POLICY}",
                         "env.max_episode_steps=100", f"env.reward_mode={args.reward_mode}"])
    agent = build_agent(cfg.run.init_checkpoint, cfg.sampler, cfg.optim.trainable)
    processor = processor_for(cfg.run.init_checkpoint, cfg.run.camera_map)
    load_before = os.getloadavg()
    layouts = []
    try:
        for name in args.layouts:
            layouts.append(Layout(name, cfg, args.num_envs))
            print(f"built {layout_label(layouts[-1].name, layouts[-1].num_envs)}: {layouts[-1].processes}"
                  f" processes in {layouts[-1].build_s:.1f} s,"
                  f" {available_gib():.1f} GiB memory left", flush=True)
        for layout in layouts:  # warm-up (first resets, allocator, caches), not timed; rollout 0's seeds
            layout.warmup_batch = layout.rollout(agent, processor, cfg, 1000, args.num_chunks, args.n_exec,
                                                 keep_batch=False)
        layout_timers_reset(layouts)
        for r in range(args.rollouts):
            for layout in layouts:
                batch = layout.rollout(agent, processor, cfg, 1000 + r, args.num_chunks, args.n_exec, keep_batch=True)
                print(f"rollout {r} {layout_label(layout.name, layout.num_envs)}:"
                      f" {layout.rollout_steps_per_s[-1]:.1f} env steps/s"
                      f" ({batch.env_steps} steps; {layout.collect_steps_per_s[-1]:.1f} without the reset)", flush=True)
    finally:
        for layout in layouts:
            layout.env.close()
    rows = [layout.summary() for layout in layouts]
    for layout, row in zip(layouts, rows):  # against the first layout of the same env count and loop
        first = next(x for x in layouts if (x.num_envs, x.pipelined) == (layout.num_envs, layout.pipelined))
        row["batches_equal_first_layout"] = all(same_batches(a, b) for a, b in zip(first.batches, layout.batches))
        row["warmup_equals_rollout_0"] = same_batches(layout.warmup_batch, layout.batches[0])
    meta = {
        "machine": machine(),
        "setup": (f"The main job's rollout: {args.num_envs} PickCube state envs unless a layout says @N (max"
                  f" {cfg.env.get('max_episode_steps')} steps, {cfg.env.get('reward_mode')}), {POLICY},"
                  f" {cfg.sampler.kind} {cfg.sampler.num_steps} steps a_noise {cfg.sampler.a_noise}, num_chunks {args.num_chunks}, n_exec {args.n_exec},"
                  f" OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch threads 1."),
        "note": (f"{args.rollouts} timed rollouts per layout after a warm-up one, layouts alternating; 1-min"
                 f" load average {load_before[0]:.1f} before and {os.getloadavg()[0]:.1f} after (other jobs"
                 " share the cores). Batches (rewards, dones, actions) identical to the first layout's of the same"
                 " env count and loop (unpipelined / pipelined) for the same seeds: "
                 + ", ".join(f"{r['layout']}: {r['batches_equal_first_layout']}" for r in rows)
                 + "; the warm-up rollout (rollout 0's seeds) identical to rollout 0: "
                 + ", ".join(f"{r['layout']}: {r['warmup_equals_rollout_0']}" for r in rows) + "."),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rl_throughput.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    text = to_markdown(rows, meta)
    with open(os.path.join(args.out, "rl_throughput.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


if __name__ == "__main__":
    sys.exit(main())
