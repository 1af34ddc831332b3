"""What hiding the inference latency costs in success: `pirl eval prefetch_steps=d` for d = 0, 1, ...

    python bench/prefetch.py [--checkpoint assets/pickcube_tiny_sft_v5_2k] [--prefetch 0 1 2 3 4 5] [--inpaint]

A robot behind `pirl.serve.broker.ActionChunkBroker(n_exec, prefetch_steps=d)` never waits for the server
when an answer takes at most d control steps, but every chunk after an episode's first then acts on an
observation d steps old. `pirl eval prefetch_steps=d` plays each episode exactly so (docs/serve.md). Each d
runs on the same seeds and initial noises, so the table pairs every d with d = 0 episode by episode
(won / lost and the sign test). Writes bench/results/prefetch_<checkpoint name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from bench.report import write_results  # noqa: E402
from pirl.algos.stats import paired_counts, sign_test_p, wilson_interval  # noqa: E402
from pirl.cli import main as pirl  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/pickcube_tiny_sft_v5_2k")
    p.add_argument("--prefetch", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--seed", type=int, default=10000, help="the first test seed (validation seeds start at 20000)")
    p.add_argument("--work", default="runs/prefetch", help="where the evaluations are written")
    p.add_argument("--inpaint", action="store_true",
                   help="also each d with real-time chunking (inpaint=true), paired with the same d = 0 baseline")
    p.add_argument("--inpaint-beta", type=float, nargs="+", default=[5.0],
                   help="with --inpaint: the caps on the pull onto the old chunk (inpaint_beta), one row each")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    name = Path(args.checkpoint).name
    out = args.out or str(REPO / "bench" / "results" / f"prefetch_{name}")
    results = {}
    for beta in [None, *(args.inpaint_beta if args.inpaint else [])]:  # None: no inpainting
        for d in args.prefetch:
            run_dir = Path(args.work) / name / (f"d{d}" if beta is None else f"d{d}_inpaint_beta{beta:g}")
            extra = [] if beta is None else ["inpaint=true", f"inpaint_beta={beta}"]
            if pirl(["eval", f"checkpoint={args.checkpoint}", f"episodes={args.episodes}", f"seed={args.seed}",
                     f"prefetch_steps={d}", *extra, f"output_dir={run_dir}"]) != 0:
                return 1
            results[d, beta] = json.loads((run_dir / "results.json").read_text())
    base = {r["seed"]: r["success"] for r in results[args.prefetch[0], None]["per_episode"]}
    rows = []
    for (d, beta), r in results.items():
        mine = {e["seed"]: e["success"] for e in r["per_episode"]}
        won, lost = paired_counts(mine, base)
        rows.append({"prefetch_steps": d, "inpaint_beta": beta, "successes": r["successes"], "episodes": r["episodes"],
                     "ci95": list(wilson_interval(r["successes"], r["episodes"])), "won": won, "lost": lost,
                     "p": sign_test_p(won, lost), "mean_length": r["mean_length"]})
    first = results[args.prefetch[0], None]
    meta = {"checkpoint": args.checkpoint, "task": first["task"], "num_steps": first["num_steps"],
            "n_exec": first["n_exec"], "max_episode_steps": first["max_episode_steps"], "seeds":
            [args.seed, args.seed + args.episodes - 1]}
    lines = [f"# Success under d steps of observation delay (`pirl eval prefetch_steps=d`)\n",
             f"`python bench/prefetch.py --checkpoint {args.checkpoint}`: {meta['task']}, K = {meta['num_steps']}, "
             f"n_exec = {meta['n_exec']}, {meta['max_episode_steps']}-step episodes, test seeds "
             f"{meta['seeds'][0]}..{meta['seeds'][1]}, the same initial noises for every d. Every chunk after an "
             "episode's first is computed from the observation d steps before the previous chunk ends and run from "
             f"its index d, as `ActionChunkBroker(n_exec, prefetch_steps=d)` runs it on a robot whose answers take "
             f"d control steps. Paired against d = {args.prefetch[0]} episode by episode. `inpaint`: each new chunk "
             "also steered onto the previous chunk's remaining actions (real-time chunking, docs/serve.md), the "
             "pull capped at beta.\n",
             "| prefetch steps d | inpaint (beta) | success | 95% interval | vs d = 0: won / lost (sign test p) | mean length |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        inpaint = "no" if r["inpaint_beta"] is None else f"yes ({r['inpaint_beta']:g})"
        lines.append(f"| {r['prefetch_steps']} | {inpaint} | "
                     f"{r['successes']}/{r['episodes']} = {r['successes'] / r['episodes']:.2f} | "
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['won']} / {r['lost']} ({r['p']:.2g}) | "
                     f"{r['mean_length']:.1f} |")
    return write_results(out, {"meta": meta, "rows": rows}, lines)


if __name__ == "__main__":
    sys.exit(main())
