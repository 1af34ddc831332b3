"""Paired comparison of two evaluations on the same seeds: won / lost episodes and the sign test.

    pirl eval checkpoint=A episodes=128 seed=10000      # writes A/eval/results.json
    pirl eval checkpoint=B episodes=128 seed=10000
    python3 bench/paired.py B/eval A/eval               # B against A

Both evaluations must cover the same seeds with the same initial noises (`pirl eval` draws each
episode's noise from its seed, so equal seed lists are enough). The ODE success of one policy on 128
episodes moves by about ±5 points with the noises alone; the discordant episodes are what differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from pirl.algos.stats import paired_counts, sign_test_p, wilson_interval  # noqa: E402
from pirl.train.rl import load_episode_outcomes as outcomes  # noqa: E402


def compare(mine: dict, base: dict) -> dict:
    if set(mine) != set(base):
        raise ValueError(f"the evaluations cover different seeds ({len(set(mine) ^ set(base))} differ)")
    won, lost = paired_counts(mine, base)
    n, a, b = len(mine), sum(mine.values()), sum(base.values())
    return {"episodes": n, "successes": a, "base_successes": b, "interval": wilson_interval(a, n),
            "base_interval": wilson_interval(b, n), "won": won, "lost": lost, "p": sign_test_p(won, lost)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mine", help="results.json (or its directory) of the policy under test")
    parser.add_argument("base", help="results.json (or its directory) of the policy it is compared with")
    args = parser.parse_args(argv)
    try:
        r = compare(outcomes(args.mine), outcomes(args.base))
    except (OSError, KeyError, ValueError) as exc:
        sys.exit(f"bench/paired.py: {exc}")
    print(f"{r['successes']}/{r['episodes']} [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}] vs "
          f"{r['base_successes']}/{r['episodes']} [{r['base_interval'][0]:.2f}, {r['base_interval'][1]:.2f}]: "
          f"{r['won']} won / {r['lost']} lost, sign test p = {r['p']:.2g}")


if __name__ == "__main__":
    main()
