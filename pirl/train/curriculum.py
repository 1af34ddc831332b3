"""Which initial states an RL iteration trains on: fresh seeds, or earlier ones the policy failed.

A training env is reset at the start of every iteration with a seed that fixes its initial state
(cube and goal positions in ManiSkill, the init-state index in LIBERO). Drawn fresh, the seeds
follow the task's initial-state distribution, so a region where the policy still fails (PickCube:
cubes near the edge of their square, `bench/results/initial_states_v5.md`) gets the same share of
rollouts as regions it has solved. With `run.replay_failures = r > 0`, a share r of each
iteration's reset slots instead replays seeds from earlier iterations, drawn without replacement
with probability proportional to each seed's failure rate so far (a failure-weighted form of
prioritised level replay, Jiang et al. 2021); evaluation seeds are never among them, and
evaluation still draws every initial state fresh.

The state of the curriculum is the list of (seed, success) outcomes of the earlier iterations'
first episodes, which the trainer keeps in its history (and so in every checkpoint): a resumed run
plans the same resets as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def failure_rates(outcomes: Iterable[tuple[int, bool]]) -> dict[int, float]:
    """seed -> fraction of its tried episodes that failed, over (seed, success) outcomes."""
    tries: dict[int, int] = {}
    failures: dict[int, int] = {}
    for seed, success in outcomes:
        seed = int(seed)
        tries[seed] = tries.get(seed, 0) + 1
        failures[seed] = failures.get(seed, 0) + (not success)
    return {seed: failures[seed] / tries[seed] for seed in tries}


def plan_resets(fresh: Sequence[int], outcomes: Iterable[tuple[int, bool]], replay_fraction: float,
                rng: np.random.Generator) -> list[int]:
    """The reset seeds of one iteration: `fresh` with some slots replaced by failed earlier seeds.

    fresh: the seeds the iteration would use without a curriculum, one per env; envs that share a
      seed (a GRPO group) form one slot and get the same replacement.
    outcomes: (seed, first-episode success) of earlier iterations.
    A share `replay_fraction` of the slots (rounded down, at most the number of seeds with a
    failure) gets a seed drawn without replacement with probability proportional to its failure
    rate; the replaced slots are the first ones, so the rest keep their fresh seeds.
    """
    if not 0.0 <= replay_fraction <= 1.0:
        raise ValueError(f"replay fraction {replay_fraction} outside [0, 1]")
    slots = list(dict.fromkeys(int(s) for s in fresh))  # distinct seeds, in order
    rates = failure_rates(outcomes)
    failed = sorted(s for s, rate in rates.items() if rate > 0 and s not in slots)
    count = min(int(replay_fraction * len(slots)), len(failed))
    if count == 0:
        return [int(s) for s in fresh]
    weights = np.array([rates[s] for s in failed])
    chosen = rng.choice(len(failed), size=count, replace=False, p=weights / weights.sum())
    replacement = dict(zip(slots[:count], (failed[i] for i in chosen), strict=True))
    return [replacement.get(int(s), int(s)) for s in fresh]
