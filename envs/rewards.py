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
"""
from __future__ import annotations

GRASP_WEIGHT = 0.1
STILL_GRASPED_WEIGHT = 0.1
SUCCESS_WEIGHT = 1.0


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
