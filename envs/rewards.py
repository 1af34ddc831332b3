"""Reward shaping shared by the CPU and GPU ManiSkill paths (works on numpy arrays and torch tensors).

πRL's ManiSkill reward (METHODS.md §4) is a *differenced* potential:

    phi_t = 0.1 * grasped_t + 0.1 * (grasped_t and grasped_{t-1}) + 1.0 * success_t
    r_t   = phi_t - phi_{t-1},   phi before the first step = 0

so an episode's return telescopes to phi at its last step (at most 1.2), grasping then dropping the
object gives back the grasp bonus, and holding it does not pay again at every step.

`dense_diff` differences ManiSkill's own normalized dense reward the same way (phi_t = that reward
after step t, in [0, 1], 1 on success; phi before the first step = 0). Its return also telescopes to
phi at the last step: 1 for a success, partial credit for a failure by how far it got (gripper near
the object, object grasped, object near the goal). Returns stay O(1) for PPO's value clip, while every
step that moves the gripper toward the object or the held object toward the goal pays at once: a
per-step signal where the stage potential above pays only at grasp and success.

`shaped_dense_diff` differences the sum of the two potentials, the dense one weighted by
`DENSE_WEIGHT` (0.2): phi_t = shaped phi_t + 0.2 * dense phi_t. On PickCube a held cube 3-5 cm from
the goal has dense phi ~0.55-0.57 (reaching ~1, grasped 1, place 0.75-0.86, out of 5), so a near miss
ends at ~0.31 against 1.4 for a success, where under `dense_diff` alone it ends at ~0.56 against 1: most
of the contrast that decides the last failures gone. And a policy that holds the cube past the goal,
where no sampled rollout succeeds and the stage potential gives no signal at all, is still paid for
every millimetre back towards it (`bench/results/failure_modes_v5_replay_200.md`).
"""
from __future__ import annotations

GRASP_WEIGHT = 0.1
STILL_GRASPED_WEIGHT = 0.1
SUCCESS_WEIGHT = 1.0
DENSE_WEIGHT = 0.2  # shaped_dense_diff: weight of ManiSkill's normalized dense potential


def shaped_potential(grasped, prev_grasped, success):
    """phi_t for boolean (array) inputs; returns float of the same kind."""
    grasped = grasped * 1.0
    return (GRASP_WEIGHT * grasped + STILL_GRASPED_WEIGHT * grasped * (prev_grasped * 1.0)
            + SUCCESS_WEIGHT * (success * 1.0))


class DifferencedPotential:
    """r_t = phi_t - phi_{t-1} for a potential the env computes (phi before the first step = 0).

    Keeps phi_{t-1} per env (a float, or an array/tensor for a batch of envs)."""

    def __init__(self):
        self.prev_potential = 0.0

    def reset(self, mask=None) -> None:
        """Start new episodes (all of them, or where the boolean `mask` is set)."""
        self.prev_potential = 0.0 if mask is None else self.prev_potential * (~mask * 1.0)

    def __call__(self, potential):
        reward = potential - self.prev_potential
        self.prev_potential = potential
        return reward


class DifferencedShapedReward(DifferencedPotential):
    """πRL's stage potential, differenced; also keeps grasped_{t-1}, which the potential reads."""

    def __init__(self):
        super().__init__()
        self.prev_grasped = False

    def reset(self, mask=None) -> None:
        super().reset(mask)
        self.prev_grasped = False if mask is None else self.prev_grasped & ~mask

    def __call__(self, grasped, success):
        reward = super().__call__(shaped_potential(grasped, self.prev_grasped, success))
        self.prev_grasped = grasped
        return reward


def differenced_reward(mode: str, shaper: DifferencedShapedReward, differ: DifferencedPotential, grasped, success,
                       env_reward):
    """One step's reward for the differenced modes (`shaped_diff`, `dense_diff`, `shaped_dense_diff`),
    from the env's is_grasped / success flags and its own (normalized dense) reward; any other mode
    returns the env's reward. Works per env (bool, float) and per batch (tensors), for every backend."""
    if mode == "shaped_diff":
        return shaper(grasped, success)
    if mode == "dense_diff":
        return differ(env_reward)
    if mode == "shaped_dense_diff":
        return shaper(grasped, success) + DENSE_WEIGHT * differ(env_reward)
    return env_reward
