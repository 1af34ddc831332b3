"""ManiSkill3 GPU-simulation throughput: PickCube-v1 env steps/s at several batch sizes, raw and with
the tiny pirl policy in the loop (one process, one GPU).

    python bench/gpu_envs.py [--envs 256 1024] [--steps 100] [--warmup 10] [--device cuda]
                             [--out DIR_OR_PREFIX] [--dry-run]

Part "raw": ManiSkill's own batched env, gym.make("PickCube-v1", obs_mode="state",
  control_mode="pd_ee_delta_pose", render_backend="none", sim_backend="gpu", num_envs=N), driven
  with uniform random actions in [-1, 1] made on the GPU (--actions zero for zeros). After --warmup
  steps, --steps steps are timed (CUDA synchronised at both ends); steps/s = N * steps / seconds.
  Auto-resets are not involved (gym's TimeLimit only flags truncation; nothing is reset).
Part "policy": pirl's env, envs.maniskill.make_maniskill_env with backend "gpu" (ManiSkillGPUBackend
  behind VLAEnv: batched CUDA sim, per-env numpy observations, partial auto-resets), configured as
  configs/env/maniskill_pickcube_state.yaml with the overrides of
  configs/experiment/maniskill_pickcube_tiny.yaml (100-step episodes, shaped_diff reward), and the
  shipped policy assets/pickcube_tiny_sft_v3 on --device (pirl.train.common.load_bundle: bf16
  weights on CUDA), acting through pirl.train.rl_core.act with the experiment's sampler (Flow-SDE,
  num_steps 4, a_noise 0.5), n_exec 5 env steps per chunk: the RL rollout loop minus its bookkeeping.
  After 2 warm-up chunks, chunks are timed until --steps steps per env; steps/s counts executed env
  steps (info["exec_mask"]). Time is split into "policy" (processor + model + copy back, CUDA
  synchronised), "sim" (ManiSkill's env.step and the partial resets, CUDA synchronised), and
  "adapter" (the rest of step_chunk: pirl's per-env numpy observations, rewards, bookkeeping).

Every measurement runs in its own child process of this script (--no-isolate: in this one, in a try
block): a failure, crash or hang (--part-timeout) prints one "FAILED ..." line and the script goes
on; the JSON and markdown are written after each measurement, with whatever was measured.
Writes OUT.json and OUT.md (OUT defaults to bench/results/gpu_envs; a directory gets gpu_envs.*).

--dry-run checks the plumbing on the CPU in about a minute: 1 env, sim_backend "cpu" (ManiSkill's CPU
sim takes one env per process), a few steps, the policy on the CPU; the policy part then builds
ManiSkillGPUBackend itself, as make_maniskill_env does for backend "gpu".

Needs ManiSkill3 (mani_skill, sapien, gymnasium), Vulkan (SAPIEN makes render materials even with
render_backend "none"), and SAPIEN's PhysX GPU library ~/.sapien/physx/VERSION/libPhysXGpu_64.so, which
sapien downloads from GitHub on first GPU use: on a machine without network bring it and pass
--physx-gpu-lib FILE (checked before anything else). PickCube needs no downloaded assets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
TASK = "PickCube-v1"
CONTROL_MODE = "pd_ee_delta_pose"
CHECKPOINT = "assets/pickcube_tiny_sft_v3"
# configs/experiment/maniskill_pickcube_tiny.yaml (run.n_exec, sampler.num_steps / a_noise, env overrides)
N_EXEC, NUM_STEPS, A_NOISE = 5, 4, 0.5
ENV_SECTION = dict(task=TASK, obs_mode="state", control_mode=CONTROL_MODE, reward_mode="shaped_diff",
                   max_episode_steps=100)


def physx_gpu_library(copy_from: str | None = None) -> str:
    """Where SAPIEN looks for PhysX's GPU library (libPhysXGpu_64.so); copy_from puts one there.

    sapien.physx.enable_gpu() downloads it from GitHub on first use when it is absent: a machine
    without network then fails (or hangs) in gym.make. Checked first, so that failure costs nothing.
    """
    import shutil

    import sapien.physx

    path = os.path.join(os.path.expanduser("~"), ".sapien", "physx", sapien.physx.version(), "libPhysXGpu_64.so")
    if copy_from:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(copy_from, path)
    return path


def sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def raw_throughput(num_envs: int, sim_backend: str, device: str, steps: int, warmup: int, actions: str) -> dict:
    """ManiSkill's own batched env: gym.make + reset, then timed env.step calls."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    started = time.perf_counter()
    env = gym.make(TASK, num_envs=num_envs, obs_mode="state", control_mode=CONTROL_MODE,
                   render_backend="none", sim_backend=sim_backend, reward_mode="normalized_dense")
    build_s = time.perf_counter() - started
    try:
        base = env.unwrapped
        sim_device = base.device
        dim = int(base.single_action_space.shape[0])
        gen = torch.Generator(device=sim_device).manual_seed(0)

        def action():
            if actions == "zero":
                return torch.zeros((num_envs, dim), device=sim_device)
            return torch.rand((num_envs, dim), generator=gen, device=sim_device) * 2 - 1

        started = time.perf_counter()
        obs, _ = env.reset(seed=0)
        sync(str(sim_device))
        reset_s = time.perf_counter() - started
        for _ in range(warmup):
            env.step(action())
        sync(str(sim_device))
        started = time.perf_counter()
        for _ in range(steps):
            obs, reward, terminated, truncated, info = env.step(action())
        sync(str(sim_device))
        seconds = time.perf_counter() - started
        return {"num_envs": num_envs, "sim_backend": sim_backend, "sim_device": str(sim_device), "actions": actions,
                "steps": steps, "warmup": warmup, "env_steps": num_envs * steps, "seconds": round(seconds, 4),
                "steps_per_s": round(num_envs * steps / seconds, 1), "ms_per_step": round(1e3 * seconds / steps, 3),
                "build_s": round(build_s, 2), "first_reset_s": round(reset_s, 2), "obs_dim": int(obs.shape[-1]),
                "successes_last_step": int(torch.as_tensor(info.get("success", torch.zeros(1))).sum())}
    finally:
        env.close()


class Timer:
    """Wraps a callable; sums its wall-clock seconds (CUDA synchronised after each call)."""

    def __init__(self, fn, device: str):
        self.fn, self.device, self.seconds, self.calls = fn, device, 0.0, 0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            out = self.fn(*args, **kwargs)
            sync(self.device)
            return out
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


def load_agent(device: str, precision: str | None):
    """The shipped tiny policy as rl_core's Agent (fresh value head), its processor, the sampler."""
    from pirl.train.common import load_bundle
    from pirl.train.rl_core import Agent, SamplerConfig

    policy, processor = load_bundle(os.path.join(ROOT, CHECKPOINT), device=device, precision=precision)
    sampler = SamplerConfig(kind="flow_sde", num_steps=NUM_STEPS, a_noise=A_NOISE)
    agent = Agent.build(policy, sampler).to(device)
    agent.eval()
    return agent, processor, sampler


def build_pirl_env(num_envs: int, backend: str):
    from envs.base import VLAEnv
    from envs.config import ManiSkillConfig
    from envs.maniskill import ManiSkillGPUBackend, make_maniskill_env

    section = dict(ENV_SECTION, backend=backend, num_envs=num_envs, seed=0)
    if backend == "gpu":
        return make_maniskill_env(section)
    cfg = ManiSkillConfig.from_dict(section)  # dry run: the GPU backend class on the CPU sim (1 env)
    return VLAEnv(ManiSkillGPUBackend(cfg), cfg)


def policy_throughput(num_envs: int, backend: str, device: str, steps: int, agent, processor, sampler) -> dict:
    """pirl's GPU env + the tiny policy: rl_core.act then env.step_chunk, chunk after chunk."""
    from pirl.train.rl_core import act

    started = time.perf_counter()
    env = build_pirl_env(num_envs, backend)
    build_s = time.perf_counter() - started
    try:
        gym_env = env.backend.env
        sim_device = str(env.backend.device)
        # Time ManiSkill itself (step and partial resets) inside pirl's step_chunk.
        sim_step = Timer(gym_env.step, sim_device)
        sim_reset = Timer(gym_env.reset, sim_device)
        gym_env.step, gym_env.reset = sim_step, sim_reset
        generator = torch.Generator(device=device).manual_seed(0)
        started = time.perf_counter()
        obs = env.reset(0)
        reset_s = time.perf_counter() - started
        horizon = agent.policy.config.action_horizon

        def chunk(obs):
            t0 = time.perf_counter()
            with torch.no_grad():
                _, _, _, actions = act(agent, processor, obs, sampler, generator)
                if torch.is_tensor(actions):  # the processor unnormalises to numpy (a host copy)
                    actions = actions.float().cpu().numpy()
                actions = np.asarray(actions)[:, :N_EXEC]
            t1 = time.perf_counter()
            obs, reward, terminated, truncated, info = env.step_chunk(actions, N_EXEC)
            t2 = time.perf_counter()
            return obs, info, t1 - t0, t2 - t1, terminated | truncated

        for _ in range(2):  # warm-up chunks (CUDA kernels, allocator)
            obs = chunk(obs)[0]
        sim_step.seconds = sim_reset.seconds = 0.0
        sim_step.calls = sim_reset.calls = 0
        policy_s = env_s = 0.0
        executed = chunks = episodes = successes = 0
        started = time.perf_counter()
        while executed < steps * num_envs:
            obs, info, p_s, e_s, done = chunk(obs)
            policy_s += p_s
            env_s += e_s
            executed += int(np.sum(info["exec_mask"]))
            episodes += int(np.sum(done))
            successes += int(np.sum(np.asarray(info["success_once"]) & np.asarray(done)))
            chunks += 1
        seconds = time.perf_counter() - started
        sim_s = sim_step.seconds + sim_reset.seconds
        return {"num_envs": num_envs, "backend": backend, "sim_device": sim_device, "policy_device": device,
                "policy_dtype": str(next(agent.policy.parameters()).dtype), "n_exec": N_EXEC,
                "num_steps": sampler.num_steps, "action_horizon": horizon, "chunks": chunks,
                "env_steps": executed, "seconds": round(seconds, 4), "steps_per_s": round(executed / seconds, 1),
                "policy_s": round(policy_s, 4), "env_s": round(env_s, 4), "sim_s": round(sim_s, 4),
                "adapter_s": round(env_s - sim_s, 4), "sim_step_calls": sim_step.calls,
                "sim_reset_calls": sim_reset.calls, "policy_frac": round(policy_s / seconds, 3),
                "sim_frac": round(sim_s / seconds, 3), "adapter_frac": round((env_s - sim_s) / seconds, 3),
                "ms_per_chunk": round(1e3 * seconds / chunks, 2), "episodes_done": episodes,
                "episode_successes": successes, "build_s": round(build_s, 2), "first_reset_s": round(reset_s, 2)}
    finally:
        env.close()


def out_paths(out: str | None) -> tuple[str, str]:
    prefix = out or os.path.join(RESULTS, "gpu_envs")
    if os.path.isdir(prefix) or prefix.endswith(os.sep):
        prefix = os.path.join(prefix, "gpu_envs")
    prefix = prefix[:-5] if prefix.endswith(".json") else prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    return prefix + ".json", prefix + ".md"


def markdown(report: dict) -> str:
    lines = [f"# ManiSkill3 {TASK} GPU-sim throughput", "",
             f"{report['machine']}; torch {report['torch']}; mani_skill {report.get('mani_skill', '?')}; "
             f"sapien {report.get('sapien', '?')}; {'DRY RUN (CPU) ' if report['dry_run'] else ''}"
             f"{report['started']}", "",
             "## Raw ManiSkill (obs state, pd_ee_delta_pose, render none)", "",
             "| envs | sim | actions | steps/s | ms/step | steps | build s | first reset s |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in report["raw"]:
        lines.append(f"| {r['num_envs']} | {r['sim_backend']} | {r['actions']} | {r['steps_per_s']:,.0f} | "
                     f"{r['ms_per_step']} | {r['steps']} | {r['build_s']} | {r['first_reset_s']} |")
    lines += ["", f"## pirl env + tiny policy ({CHECKPOINT}, n_exec {N_EXEC}, Flow-SDE {NUM_STEPS} steps)", "",
              "| envs | policy on | steps/s | ms/chunk | policy | sim | adapter | episodes done (success) | build s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["policy"]:
        lines.append(f"| {r['num_envs']} | {r['policy_device']} {r['policy_dtype'].replace('torch.', '')} | "
                     f"{r['steps_per_s']:,.0f} | {r['ms_per_chunk']} | {r['policy_frac']:.0%} | {r['sim_frac']:.0%} | "
                     f"{r['adapter_frac']:.0%} | {r['episodes_done']} ({r['episode_successes']}) | {r['build_s']} |")
    if report["errors"]:
        lines += ["", "## Failures", ""] + [f"- {e['part']} {e.get('num_envs', '')}: `{e['error']}`"
                                             for e in report["errors"]]
    lines += ["", "policy / sim / adapter: shares of the timed wall clock spent in rl_core.act (processor, "
              "model, copy back), in ManiSkill's env.step and resets, and in the rest of VLAEnv.step_chunk "
              "(pirl's per-env numpy observations and bookkeeping). Steps/s counts executed env steps.", ""]
    return "\n".join(lines)


def run_child(args, part: str, num_envs: int, json_path: str, report: dict) -> None:
    """Runs one measurement in a child process of this script; merges its results into report."""
    import subprocess

    prefix = f"{json_path[:-5]}.{part}{num_envs}"
    cmd = [sys.executable, os.path.abspath(__file__), "--no-isolate", "--parts", part, "--envs", str(num_envs),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--actions", args.actions, "--out", prefix] + (["--precision", args.precision] if args.precision else [])
    if args.dry_run:
        cmd.append("--dry-run")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.part_timeout)
        status = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {args.part_timeout:.0f}s"
    child = None
    try:
        with open(prefix + ".json") as f:
            child = json.load(f)
        os.remove(prefix + ".json")
        os.remove(prefix + ".md")
    except (OSError, ValueError):
        pass  # the child wrote nothing readable: `child` stays None and the status line says why
    got = False
    if child:
        for key in ("mani_skill", "sapien", "mani_skill_path"):
            report.setdefault(key, child.get(key))
        report["raw"] += child.get("raw", [])
        report["policy"] += child.get("policy", [])
        report["errors"] += [e for e in child.get("errors", []) if e["part"] != "import" or "mani_skill" not in report]
        got = bool(child.get(part))
    if not got and not (child and child.get("errors")):
        error = f"child process {status}, no result"
        print(f"FAILED {part} num_envs={num_envs} after {time.perf_counter() - started:.1f}s: {error}", flush=True)
        report["errors"].append({"part": part, "num_envs": num_envs, "error": error})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=100, help="timed env steps per env")
    parser.add_argument("--warmup", type=int, default=10, help="untimed env steps first (raw part)")
    parser.add_argument("--device", default="cuda", help="policy device (the sim runs on the GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="policy weights (default: load_bundle's, bf16 on CUDA)")
    parser.add_argument("--actions", choices=["random", "zero"], default="random")
    parser.add_argument("--parts", nargs="+", choices=["raw", "policy"], default=["raw", "policy"])
    parser.add_argument("--out", default=None, help="output prefix or directory (writes .json and .md)")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: 1 env, cpu sim, few steps")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every measurement in this process (default: one child process each)")
    parser.add_argument("--physx-gpu-lib", default=None,
                        help="libPhysXGpu_64.so to install where SAPIEN looks for it (~/.sapien/physx/VERSION/)")
    parser.add_argument("--part-timeout", type=float, default=300, help="seconds per isolated measurement")
    args = parser.parse_args()

    backend = "gpu"
    if args.dry_run:
        args.envs, args.steps, args.warmup, args.device, backend = [1], 10, 2, "cpu", "cpu"
    json_path, md_path = out_paths(args.out)
    report = {"task": TASK, "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": platform.node() + " " + platform.processor(), "python": platform.python_version(),
              "torch": torch.__version__, "argv": sys.argv[1:], "raw": [], "policy": [], "errors": []}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["machine"] += " " + report["gpu"]

    def save() -> None:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(report))

    def attempt(part: str, num_envs, fn):
        started = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # one failure must not cost the other measurements
            error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            print(f"FAILED {part} num_envs={num_envs} after {time.perf_counter() - started:.1f}s: {error}", flush=True)
            report["errors"].append({"part": part, "num_envs": num_envs, "error": error,
                                     "traceback": traceback.format_exc()[-3000:]})
            result = None
        save()
        return result

    def versions():
        import mani_skill
        import sapien

        report["mani_skill"], report["sapien"] = mani_skill.__version__, sapien.__version__
        report["mani_skill_path"] = os.path.dirname(mani_skill.__file__)
        return True

    attempt("import", None, versions)
    if backend == "gpu":
        lib = attempt("physx_gpu_library", None, lambda: physx_gpu_library(args.physx_gpu_lib))
        if lib and not os.path.isfile(lib):
            error = (f"SAPIEN's PhysX GPU library {lib} is missing: sapien.physx.enable_gpu() would download it "
                     f"from GitHub (physx-precompiled release linux-so.zip); pass --physx-gpu-lib FILE")
            print(f"FAILED gpu sim: {error}; skipping every GPU-sim measurement", flush=True)
            report["errors"].append({"part": "physx_gpu_library", "num_envs": None, "error": error})
            save()
            return 1
    if args.isolate:
        # One child process per measurement: a crash (a segfault in the simulator, say) or a hang costs
        # that measurement alone, and each GPU sim gets a fresh process.
        for part in args.parts:
            for n in args.envs:
                run_child(args, part, n, json_path, report)
                save()
        save()
        print(f"wrote {json_path} and {md_path}" + (f"; {len(report['errors'])} part(s) failed" if report["errors"] else ""))
        return 0
    if "raw" in args.parts:
        for n in args.envs:
            r = attempt("raw", n, lambda: raw_throughput(n, backend, args.device, args.steps, args.warmup, args.actions))
            if r:
                report["raw"].append(r)
                print(f"raw    envs={n:5d}: {r['steps_per_s']:12,.0f} steps/s  ({r['ms_per_step']} ms/step, "
                      f"build {r['build_s']}s)", flush=True)
                save()
    if "policy" in args.parts:
        loaded = attempt("load_policy", None, lambda: load_agent(args.device, args.precision))
        if loaded:
            for n in args.envs:
                r = attempt("policy", n, lambda: policy_throughput(n, backend, args.device, args.steps, *loaded))
                if r:
                    report["policy"].append(r)
                    print(f"policy envs={n:5d}: {r['steps_per_s']:12,.0f} steps/s  (policy {r['policy_frac']:.0%}, "
                          f"sim {r['sim_frac']:.0%}, adapter {r['adapter_frac']:.0%}; {r['ms_per_chunk']} ms/chunk)",
                          flush=True)
                    save()
    save()
    print(f"wrote {json_path} and {md_path}" + (f"; {len(report['errors'])} part(s) failed" if report["errors"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
