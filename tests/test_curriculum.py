"""The failure-replay curriculum of RL resets (`pirl.train.curriculum`): pure planning."""
from __future__ import annotations

import numpy as np
import pytest

from pirl.train.curriculum import failure_rates, plan_resets


def test_failure_rates_count_each_seeds_tries():
    rates = failure_rates([(5, False), (5, True), (7, True), (9, False), (5, False)])
    assert rates == {5: pytest.approx(2 / 3), 7: 0.0, 9: 1.0}


def test_no_replay_or_no_failures_keeps_the_fresh_seeds():
    fresh = [100, 101, 102, 103]
    rng = np.random.default_rng(0)
    assert plan_resets(fresh, [(1, False), (2, False)], 0.0, rng) == fresh
    assert plan_resets(fresh, [(1, True), (2, True)], 1.0, rng) == fresh  # nothing failed: nothing to replay
    assert plan_resets(fresh, [], 0.5, rng) == fresh


def test_only_failed_seeds_replace_the_first_slots():
    fresh = [100, 101, 102, 103]
    outcomes = [(1, True), (2, False), (3, True), (4, False), (5, False), (101, False)]
    planned = plan_resets(fresh, outcomes, 0.5, np.random.default_rng(1))
    # floor(0.5 * 4) = 2 slots; seed 101 is a fresh seed of this iteration: not a replay candidate
    assert planned[2:] == [102, 103]
    assert set(planned[:2]) <= {2, 4, 5} and len(set(planned[:2])) == 2
    # more slots than failed seeds: each failed seed once (drawn without replacement)
    planned = plan_resets(fresh, [(2, False), (4, True)], 1.0, np.random.default_rng(1))
    assert planned == [2, 101, 102, 103]


def test_replay_probability_is_proportional_to_the_failure_rate():
    # seed 1 failed 4 of 4 tries, seed 2 one of 4: one slot goes to seed 1 with probability 1 / 1.25
    outcomes = [(1, False)] * 4 + [(2, False)] + [(2, True)] * 3
    rng = np.random.default_rng(0)
    draws = [plan_resets([100, 101], outcomes, 0.5, rng)[0] for _ in range(4000)]
    share = np.mean(np.array(draws) == 1)
    assert share == pytest.approx(0.8, abs=0.02)  # 4000 draws: standard error 0.006
    assert set(draws) == {1, 2}


def test_a_group_sharing_a_seed_gets_one_replacement():
    fresh = [100, 100, 100, 200, 200, 200]  # GRPO: two groups of three
    planned = plan_resets(fresh, [(7, False), (8, False)], 0.5, np.random.default_rng(0))
    assert planned[:3] in ([7, 7, 7], [8, 8, 8]) and planned[3:] == [200, 200, 200]


def test_the_fraction_is_checked():
    with pytest.raises(ValueError, match="outside"):
        plan_resets([1], [], 1.5, np.random.default_rng(0))
