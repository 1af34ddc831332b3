"""Env throughput through the batched VLA env API: env steps/s, state and rgb observations,
1 and several worker processes, ManiSkill3 and LIBERO (CPU, software rendering).

    python bench/envs.py [--quick] [--procs 1 2] [--only maniskill|libero]

Writes bench/results/envs.json and bench/results/envs.md. Steps/s counts executed env steps
(auto-resets included, as in a rollout); build and first reset (shader warm-up) are timed apart.
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

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(make, cfg: dict, action_fn, steps: int, horizon: int = 8, n_exec: int = 5) -> dict:
    started = time.time()
    env = make(cfg)
    build_s = time.time() - started
    try:
        started = time.time()
        env.reset(seed=0)
        reset_s = time.time() - started
        rng = np.random.default_rng(0)
        b, d = env.num_envs, env.spec.action_dim
        env.step_chunk(action_fn(rng, b, horizon, d), n_exec)  # warm-up chunk
        executed, resets = 0, 0
        started = time.time()
        while executed < steps:
            _, _, term, trunc, info = env.step_chunk(action_fn(rng, b, horizon, d), n_exec)
            executed += int(info["exec_mask"].sum())
            resets += int((term | trunc).sum())
        elapsed = time.time() - started
    finally:
        env.close()
    return {"env_steps": executed, "seconds": round(elapsed, 2), "steps_per_s": round(executed / elapsed, 2),
            "build_s": round(build_s, 2), "first_reset_s": round(reset_s, 2), "auto_resets": resets}


def maniskill_cases(procs, quick):
    from envs.maniskill import make_maniskill_env

    def actions(rng, b, h, d):
        return rng.uniform(-0.5, 0.5, size=(b, h, d)).astype(np.float32)

    for obs_mode, steps in (("state", 200 if quick else 600), ("rgb", 40 if quick else 120)):
        for n in procs:
            cfg = dict(task="PickCube-v1", num_envs=n, obs_mode=obs_mode, image_size=(128, 128),
                       control_mode="pd_ee_delta_pose", reward_mode="normalized_dense")
            yield ("maniskill3", "PickCube-v1", obs_mode, n, "128x128 base_camera" if obs_mode == "rgb" else "-",
                   lambda c=cfg, s=steps * n: measure(make_maniskill_env, c, actions, s))


def libero_cases(procs, quick):
    from envs.libero import make_libero_env

    def actions(rng, b, h, d):
        a = rng.uniform(-0.3, 0.3, size=(b, h, d)).astype(np.float32)
        a[..., 6] = -1.0
        return a

    for obs_mode, cams, steps in (("state", (), 60 if quick else 200),
                                  ("rgb", ("agentview_image", "robot0_eye_in_hand_image"), 15 if quick else 40)):
        for n in procs:
            cfg = dict(suite="libero_spatial", task_ids=(0,), num_envs=n, cameras=cams, image_size=(128, 128))
            yield ("libero", "libero_spatial/0", obs_mode, n, "2 x 128x128" if cams else "-",
                   lambda c=cfg, s=steps * n: measure(make_libero_env, c, actions, s))


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Env throughput (batched VLA env API)",
        "",
        f"{meta['machine']}; {meta['note']}",
        "",
        "| simulator | task | obs | cameras | processes | env steps/s | build s | first reset s | steps timed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['simulator']} | {r['task']} | {r['obs']} | {r['cameras']} | {r['processes']} |"
                         f" failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['simulator']} | {r['task']} | {r['obs']} | {r['cameras']} | {r['processes']} |"
                     f" {r['steps_per_s']} | {r['build_s']} | {r['first_reset_s']} | {r['env_steps']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", choices=["maniskill", "libero"], default=None)
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    cases = []
    if args.only in (None, "maniskill"):
        cases += list(maniskill_cases(args.procs, args.quick))
    if args.only in (None, "libero"):
        cases += list(libero_cases(args.procs, args.quick))
    rows = []
    load_before = os.getloadavg()[0]
    for simulator, task, obs, n, cams, run in cases:
        row = {"simulator": simulator, "task": task, "obs": obs, "cameras": cams, "processes": n}
        try:
            row.update(run())
        except Exception as exc:  # keep the other rows; say what failed
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only, software rendering "
                       "(Mesa lavapipe for SAPIEN, EGL/llvmpipe for MuJoCo)",
            "note": "chunks of H=8, n_exec=5, random actions; steps/s summed over processes; 1-min load "
                    f"average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run (other "
                    "jobs share the 2 cores)",
            "python": sys.version.split()[0]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "envs.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    with open(os.path.join(args.out, "envs.md"), "w") as f:
        f.write(to_markdown(rows, meta))
    print(to_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
