"""Test-time guidance on ManiSkill PickCube: success against compute per chunk, weights chosen honestly.

    python bench/guidance.py --critic runs/qgf/critic                      # the full table (~30 min on 2 cores)
    python bench/guidance.py --critic DIR --quick                          # a smoke run (minutes)

One policy (default the shipped `assets/pickcube_tiny_sft_v3`) and one critic (`pirl critic`), every
method of `pirl.guidance` through the same episode loop as `pirl eval` (`rl_core.evaluate` with a
`PolicyActor` whose sampler is a `GuidedSampler`):

1. **Selection on validation seeds** (default 20000.., disjoint from the test seeds): each steering
   method's weight (GradStep: its step size) is swept on a log grid, extended by 3x while the best
   value is the largest tried, and the best by validation success is kept (ties: the smaller).
2. **Test seeds** (default 10000..10127): plain ODE, best-of-{2,4,8,16}, QGF at its selected weight,
   QGF + best-of-4, Jacobian, OOD, BPTT, GradStep. Success k/n with a 95% Wilson interval, and the
   measured cost per chunk: wall ms and network passes (velocity forward / backward, Q forward / backward).
3. **Coverage** beside them: pass@N of the plain policy on the test seeds, i.e. the fraction of seeds that
   at least one of N plain rollouts with independent initial noises solves. Steering reweights what the
   base policy samples (METHODS.md §5), so pass@N is about the most any steering method can reach.

Writes OUT.json and OUT.md (default bench/results/guidance).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from pirl.algos.stats import paired_counts, sign_test_p  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# (method, knob swept on validation seeds, the values tried)
SWEEPS = {
    "qgf": ("weight", [0.3, 1.0, 3.0, 10.0]),
    "qgf_jacobian": ("weight", [0.3, 1.0, 3.0, 10.0]),
    "ood": ("weight", [0.3, 1.0, 3.0, 10.0]),
    "bptt": ("weight", [0.3, 1.0, 3.0, 10.0]),
    "gradstep": ("gradstep_size", [0.1, 0.3, 1.0, 3.0]),
}


class NoiseOffsetActor:
    """A `PolicyActor` whose noise generators are seeded `seed + offset` instead of `seed`: the same
    episodes (env seeds) with independent initial noises, for pass@N."""

    def __init__(self, actor, offset: int):
        self.actor, self.offset = actor, offset

    def reset(self, seeds):
        self.actor.reset([s + self.offset for s in seeds])

    def __call__(self, obs):
        return self.actor(obs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "pickcube_tiny_sft_v3"))
    parser.add_argument("--critic", required=True)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--n-exec", type=int, default=5)
    parser.add_argument("--max-episode-steps", type=int, default=100)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--val-seed", type=int, default=20000)
    parser.add_argument("--val-episodes", type=int, default=64)
    parser.add_argument("--test-seed", type=int, default=10000)
    parser.add_argument("--test-episodes", type=int, default=128)
    parser.add_argument("--coverage-n", type=int, default=4, help="pass@N of the plain policy (N rollouts per seed)")
    parser.add_argument("--methods", nargs="+", default=["best_of_n", "qgf", "qgf_best_of_n", "qgf_jacobian", "ood",
                                                          "bptt", "gradstep"])
    parser.add_argument("--max-extensions", type=int, default=3,
                        help="while the best value is the largest tried, try 3x it (at most this many times)")
    parser.add_argument("--cost-only", default=None, metavar="RESULTS_JSON",
                        help="re-measure the cost per chunk of the methods selected in RESULTS_JSON on a fixed "
                             "batch of observations (isolated from env stepping) and rewrite its tables")
    parser.add_argument("--quick", action="store_true", help="smoke run: few episodes, two sweep values")
    parser.add_argument("--out", default=str(RESULTS / "guidance"))
    args = parser.parse_args(argv)
    if args.quick:
        args.val_episodes, args.test_episodes, args.coverage_n, args.num_envs = 4, 4, 2, 4
    torch.set_num_threads(1)

    from pirl.cli import compose, resolve_path
    from pirl.critic.q import load_critic, read_critic_meta
    from pirl.guidance import GuidanceConfig
    from pirl.guidance.config import fields_used
    from pirl.guidance.actor import GuidedSampler, resolve_clip
    from pirl.train.rl import make_env, processor_for
    from pirl.train.rl_core import PolicyActor, evaluate
    from vla.checkpoint import load_policy

    checkpoint, critic_dir = resolve_path(args.checkpoint), resolve_path(args.critic)
    policy, _ = load_policy(checkpoint)
    policy.eval()
    processor = processor_for(checkpoint, {})
    critic = load_critic(critic_dir, policy, policy_checkpoint=checkpoint)
    clip = resolve_clip("auto", processor.norm_stats["actions"].resolved_mode(processor.norm_mode))
    env_section = compose("eval", [f"env.max_episode_steps={args.max_episode_steps}"])["env"]
    env = make_env(env_section, args.num_envs, args.test_seed)
    rows: list[dict] = []

    def config_of(row: dict) -> GuidanceConfig:
        knobs = {"weight": row["weight"]} if "weight" in fields_used(row["method"]) else {}
        if row["method"] == "gradstep":
            knobs = {"gradstep_size": row["gradstep_size"]}
        if row["n"] > 1:
            knobs["n"] = row["n"]
        return make(row["method"], **knobs)

    def make(method: str, **knobs) -> GuidanceConfig:
        return GuidanceConfig(method, **({"clip": clip} if "clip" in fields_used(method) else {}), **knobs)

    if args.cost_only:
        result = json.loads(Path(args.cost_only).read_text())
        tests = [x for x in result["rows"] if x["split"] == "test"]
        result["cost"] = measure_cost(policy, processor, critic, env, [config_of(x) for x in tests], args.num_steps,
                                      args.test_seed)
        env.close()
        out = Path(args.cost_only).with_suffix("")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(to_markdown(result))
        print(to_markdown(result))
        return result

    def run(split: str, cfg: GuidanceConfig, seed: int, episodes: int, noise_offset: int = 0) -> dict:
        sampler = GuidedSampler(policy, critic, cfg, args.num_steps)
        actor = PolicyActor(policy, processor, args.num_steps, sample=sampler)
        started = time.perf_counter()
        with torch.no_grad():
            result = evaluate(None, None, env, episodes, args.n_exec, args.num_steps, seed,
                              actor=NoiseOffsetActor(actor, noise_offset) if noise_offset else actor)
        row = {"split": split, "method": cfg.method, "weight": cfg.weight, "n": cfg.num_candidates,
               "gradstep_size": cfg.gradstep_size, "noise_offset": noise_offset, "seed": seed,
               "episodes": result["episodes"], "successes": result["successes"],
               "success_rate": result["success_rate"], "success_ci95": result["success_ci95"],
               "mean_return": result["mean_return"], "wall_s": time.perf_counter() - started,
               **sampler.totals.per_chunk(), "ratio_median_per_step": sampler.totals.ratio_median_per_step,
               "per_episode": [(r["seed"], r["success"]) for r in result["per_episode"]]}
        rows.append(row)
        lo, hi = row["success_ci95"]
        print(f"{split:5s} {cfg.method:14s} w={cfg.weight:<6g} N={cfg.num_candidates:<2d} size={cfg.gradstep_size:<5g} "
              f"{row['successes']:3d}/{row['episodes']} [{lo:.2f}, {hi:.2f}]  {row['ms_per_chunk']:.1f} ms/chunk",
              flush=True)
        return row

    # 1. validation: the plain baseline and each steering method's knob
    selected: dict[str, dict] = {}
    run("val", GuidanceConfig(), args.val_seed, args.val_episodes)
    for method in [m for m in args.methods if m in SWEEPS]:
        knob, values = SWEEPS[method]
        values = list(values[1:3] if args.quick else values)
        results = [(run("val", make(method, **{knob: v}), args.val_seed, args.val_episodes), v) for v in values]
        best = lambda: max(results, key=lambda rv: (rv[0]["successes"], -rv[1]))  # noqa: E731  ties: the smaller
        extensions = 0
        while best()[1] == values[-1] and extensions < args.max_extensions:  # the best is at the top edge
            values.append(values[-1] * 3)
            results.append((run("val", make(method, **{knob: values[-1]}), args.val_seed, args.val_episodes), values[-1]))
            extensions += 1
        selected[method] = {knob: best()[1]}
    # 2. test seeds
    run("test", GuidanceConfig(), args.test_seed, args.test_episodes)
    if "best_of_n" in args.methods:
        for n in ([2, 4] if args.quick else [2, 4, 8, 16]):
            run("test", make("best_of_n", n=n), args.test_seed, args.test_episodes)
    for method in [m for m in args.methods if m in SWEEPS]:
        run("test", make(method, **selected[method]), args.test_seed, args.test_episodes)
    if "qgf_best_of_n" in args.methods and "qgf" in selected:
        run("test", make("qgf_best_of_n", n=4, **selected["qgf"]), args.test_seed, args.test_episodes)
    # 3. coverage: pass@N of the plain policy on the test seeds (offset 0 is the plain row above)
    plain = next(r for r in rows if r["split"] == "test" and r["method"] == "none")
    solved = {s for s, ok in plain["per_episode"] if ok}
    coverage = [{"n": 1, "pass_at_n": len(solved) / plain["episodes"]}]
    for k in range(1, args.coverage_n):
        extra = run("cover", GuidanceConfig(), args.test_seed, args.test_episodes, noise_offset=1_000_000 * k)
        solved |= {s for s, ok in extra["per_episode"] if ok}
        coverage.append({"n": k + 1, "pass_at_n": len(solved) / plain["episodes"]})
    cost = measure_cost(policy, processor, critic, env, [config_of(x) for x in rows if x["split"] == "test"],
                        args.num_steps, args.test_seed)
    meta = read_critic_meta(critic_dir).get("metadata", {})
    result = {"cost": cost, "checkpoint": checkpoint, "critic": critic_dir, "critic_metadata": meta, "num_steps": args.num_steps,
              "n_exec": args.n_exec, "max_episode_steps": args.max_episode_steps, "selected": selected,
              "coverage": coverage, "rows": rows, "quick": args.quick}
    env.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def measure_cost(policy, processor, critic, env, configs, num_steps: int, seed: int, repeats: int = 30) -> list[dict]:
    """Wall ms per chunk of each config on one fixed batch of `env.num_envs` start observations, the
    methods interleaved round-robin so that machine noise hits them alike (median over `repeats`)."""
    import statistics

    from pirl.guidance.actor import GuidedSampler
    from pirl.train.rl_core import PolicyActor

    obs = env.reset(seed)
    samplers = [GuidedSampler(policy, critic, cfg, num_steps) for cfg in configs]
    actors = [PolicyActor(policy, processor, num_steps, sample=s) for s in samplers]
    times = [[] for _ in configs]
    for _ in range(repeats):
        for i, actor in enumerate(actors):
            actor.reset(list(range(seed, seed + env.num_envs)))
            start = time.perf_counter()
            with torch.no_grad():
                actor(obs)
            times[i].append(1e3 * (time.perf_counter() - start) / env.num_envs)
    return [{"method": cfg.method, "weight": cfg.weight, "n": cfg.num_candidates, "gradstep_size": cfg.gradstep_size,
             "ms_per_chunk": statistics.median(t)} for cfg, t in zip(configs, times)]


def paired(row: dict, base: dict) -> tuple[int, int]:
    """Episodes (same seed) this method solved and the base did not, and the reverse."""
    return paired_counts(dict(map(tuple, row["per_episode"])), dict(map(tuple, base["per_episode"])))


def to_markdown(r: dict) -> str:
    rows = r["rows"]
    plain_test = next(x for x in rows if x["split"] == "test" and x["method"] == "none")
    base_ms = plain_test["ms_per_chunk"] or float("nan")

    def label(x):
        parts = [x["method"]]
        if x["method"] in ("qgf", "qgf_jacobian", "ood", "bptt", "qgf_best_of_n"):
            parts.append(f"w={x['weight']:g}")
        if x["n"] > 1:
            parts.append(f"N={x['n']}")
        if x["method"] == "gradstep":
            parts.append(f"size={x['gradstep_size']:g}")
        return " ".join(parts)

    tests = [x for x in rows if x["split"] == "test"]
    cost = r.get("cost") or [{"ms_per_chunk": x["ms_per_chunk"]} for x in tests]
    base_cost = cost[tests.index(plain_test)]["ms_per_chunk"]
    lines = [f"Test-time guidance on PickCube-v1 (policy `{Path(r['checkpoint']).name}`, K = {r['num_steps']}, "
             f"n_exec = {r['n_exec']}, {r['max_episode_steps']}-step episodes; critic `{r['critic']}`).", "",
             "Test seeds (weights selected on the validation seeds below). Cost: wall ms per chunk on one fixed "
             "batch of observations, methods interleaved (median of 30), and network passes per chunk:", "",
             "| method | success | 95% interval | paired vs plain: won / lost (sign test p) | ms / chunk | x plain time "
             "| velocity passes | backward passes | Q passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x, c in zip(tests, cost):
        lo, hi = x["success_ci95"]
        won, lost = paired(x, plain_test)
        lines.append(f"| {label(x)} | {x['successes']}/{x['episodes']} = {x['success_rate']:.2f} | [{lo:.2f}, {hi:.2f}] "
                     f"| {won} / {lost} ({sign_test_p(won, lost):.2g}) | {c['ms_per_chunk']:.2f} | {c['ms_per_chunk'] / base_cost:.2f} | {x['velocity_evals']:.0f} "
                     f"| {x['velocity_backwards'] + x['q_backwards']:.0f} | {x['q_evals']:.0f} |")
    qgf = next((i for i, x in enumerate(tests) if x["method"] == "qgf"), None)
    bo16 = next((i for i, x in enumerate(tests) if x["method"] == "best_of_n" and x["n"] == 16), None)
    if qgf is not None:
        gain = tests[qgf]["success_rate"] - plain_test["success_rate"]
        ratio = cost[qgf]["ms_per_chunk"] / base_cost
        lines += ["", f"Target 1 (QGF >= +15 points over plain at <= 1.6x its sampling time): {100 * gain:+.1f} points "
                  f"at {ratio:.2f}x: **{'met' if gain >= 0.15 and ratio <= 1.6 else 'not met'}**."]
        if bo16 is not None:
            above = tests[qgf]["success_rate"] - tests[bo16]["success_rate"]
            cheaper = cost[bo16]["ms_per_chunk"] / cost[qgf]["ms_per_chunk"]
            passes = (tests[bo16]["velocity_evals"] + tests[bo16]["velocity_backwards"]) / max(
                tests[qgf]["velocity_evals"] + tests[qgf]["velocity_backwards"] + tests[qgf]["q_backwards"], 1)
            lines.append(f"Target 2 (QGF above best-of-16 at 8x less compute): {100 * above:+.1f} points, best-of-16 "
                         f"costs {cheaper:.1f}x QGF's time ({passes:.1f}x its network passes): "
                         f"**{'met' if above > 0 and cheaper >= 8 else 'not met'}**.")
    lines += ["", "Coverage (pass@N of the plain policy on the test seeds: the ceiling of reweighting):", "",
              "| N | " + " | ".join(str(c["n"]) for c in r["coverage"]) + " |",
              "|---|" + "---|" * len(r["coverage"]),
              "| pass@N | " + " | ".join(f"{c['pass_at_n']:.2f}" for c in r["coverage"]) + " |", "",
              "Validation seeds (selection):", "", "| method | success | ms / chunk |", "|---|---|---|"]
    for x in [x for x in rows if x["split"] == "val"]:
        lines.append(f"| {label(x)} | {x['successes']}/{x['episodes']} = {x['success_rate']:.2f} | {x['ms_per_chunk']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
