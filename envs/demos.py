"""ManiSkill demonstrations: ManiSkill's own motion planners -> training controller -> LeRobot dataset.

Per episode (seed s):
 1. the task's motion-planning solution (mani_skill.examples.motionplanning.panda) runs in a
    pd_joint_pos env reset with seed s; its joint-position actions are logged;
 2. an env with the training controller (e.g. pd_ee_delta_pose), reset with the same seed s, tracks
    that trajectory closed-loop with ManiSkill's controller converter
    (mani_skill.trajectory.utils.actions.conversion.from_pd_joint_pos); every step this env
    takes is recorded (observation before the step, action);
 3. the episode is cut `after_success` steps after its first success step (0: at it) and kept only
    if it succeeded. The planner's trajectory goes on to the exact goal after the first success (which
    fires as soon as the object is inside the goal radius): keeping those steps shows the policy that
    reaching the radius is not the end of the motion. Cut at the first success, PickCube's demos end
    with the cube 1-2 cm from the goal (radius 2.5 cm), and the cloned policy stops 2.5-5 cm away.
Because step 2 starts from the seeded initial state the API also reaches with reset(seed=s), the
recorded actions replayed open loop through the API repeat the episode (the simulator is
deterministic on the CPU).

CLI (`python -m envs.demos` or envs.demos.main(argv); `pirl demos` forwards its arguments):
    --task PickCube-v1 --num-episodes 10 --out DIR [--control-mode pd_ee_delta_pose]
    [--obs-mode rgb|state] [--image-size 128 128] [--cameras base_camera] [--seed 0]
    [--max-steps 200] [--max-attempts 2N] [--image-mode image|video] [--fps 20]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import ManiSkillConfig
from .dataset import Episode, write_lerobot_dataset

log = logging.getLogger(__name__)


def _solutions() -> dict[str, Any]:
    from mani_skill.examples.motionplanning.panda import solutions as s

    return {
        "PickCube-v1": s.solvePickCube, "PushCube-v1": s.solvePushCube, "StackCube-v1": s.solveStackCube,
        "PullCube-v1": s.solvePullCube, "LiftPegUpright-v1": s.solveLiftPegUpright,
        "PegInsertionSide-v1": s.solvePegInsertionSide, "PlugCharger-v1": s.solvePlugCharger,
        "PlaceSphere-v1": s.solvePlaceSphere, "StackPyramid-v1": s.solveStackPyramid,
    }


def _recording_wrapper():
    import gymnasium as gym

    class StepRecorder(gym.Wrapper):
        """Logs every action sent through it, and (optionally) the observation and info after it."""

        def __init__(self, env):
            super().__init__(env)
            self.actions: list[np.ndarray] = []
            self.results: list[tuple[Any, dict]] = []

        def reset(self, **kwargs):
            self.actions, self.results = [], []
            return self.env.reset(**kwargs)

        def step(self, action):
            from mani_skill.utils import common

            obs, reward, terminated, truncated, info = self.env.step(action)
            self.actions.append(np.asarray(common.to_numpy(action), dtype=np.float32).reshape(-1))
            self.results.append((obs, info))
            return obs, reward, terminated, truncated, info

    return StepRecorder


@dataclass
class DemoReport:
    out_dir: str
    episodes: int
    attempts: int
    seeds: list[int]
    lengths: list[int]
    seconds: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class DemoGenerator:
    """Holds the planner env (pd_joint_pos) and the recording env (training controller) so that
    consecutive episodes reuse them (building a camera env costs seconds of shader warm-up)."""

    def __init__(self, cfg: ManiSkillConfig, max_steps: int, after_success: int = 0):
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401

        from .maniskill import ManiSkillSingleEnv, check_assets

        check_assets(cfg.task)
        self.solve = _solutions().get(cfg.task)
        if self.solve is None:
            raise ValueError(f"no ManiSkill motion-planning solution for {cfg.task} (have {sorted(_solutions())})")
        self.cfg, self.max_steps, self.after_success = cfg, max_steps, after_success
        self.recorder_cls = _recording_wrapper()
        # Planner trajectories can be longer than the kept episodes: give both envs ample room.
        self.planner_env = self.recorder_cls(gym.make(cfg.task, obs_mode="none", control_mode="pd_joint_pos",
                                                      render_backend="none", sim_backend="cpu",
                                                      max_episode_steps=max_steps * 4))
        self.target = ManiSkillSingleEnv(cfg, max_episode_steps=max_steps * 4)
        self.spec = self.target.spec()

    def episode(self, seed: int) -> Episode | None:
        """One demo for `seed`, or None when planning, conversion or the task failed."""
        from mani_skill.trajectory.utils.actions.conversion import from_pd_joint_pos
        from mani_skill.utils import common

        planner_env, target = self.planner_env, self.target
        try:
            planner_env.reset(seed=seed, options={"reconfigure": True})  # fresh scene: no history
            result = self.solve(planner_env, seed=seed, debug=False, vis=False)
        except Exception as exc:  # the planners raise on unreachable poses; that seed is skipped
            log.info("seed %d: motion planning failed (%s)", seed, exc)
            return None
        if result == -1 or not planner_env.actions:
            return None
        joint_actions = list(planner_env.actions)

        planner_env.reset(seed=seed, options={"reconfigure": True})
        first_obs, _ = target.reset(seed, hard=True)
        start_a = np.asarray(planner_env.unwrapped.get_state()).reshape(-1)
        start_b = target.get_state()
        if not np.allclose(start_a, start_b, atol=1e-5):
            raise RuntimeError(f"{self.cfg.task}: seed {seed} gives different initial states per controller")
        tracked = self.recorder_cls(target.raw_env)
        from_pd_joint_pos(self.cfg.control_mode, joint_actions, planner_env.unwrapped, tracked)

        success_at = next((t for t, (_, info) in enumerate(tracked.results)
                           if bool(np.asarray(common.to_numpy(info.get("success", False))).reshape(-1)[0])), None)
        if success_at is None or success_at + 1 > self.max_steps:
            return None
        length = min(success_at + 1 + self.after_success, len(tracked.results), self.max_steps)
        # Observation before each kept action: the reset's, then the one after each earlier step.
        observations = [first_obs] + [target.obs_adapter(common.unbatch(common.to_numpy(raw)))
                                      for raw, _ in tracked.results[:length - 1]]
        return Episode(
            prompt=self.cfg.instruction,
            state=np.stack([o["state"] for o in observations]),
            actions=np.stack(tracked.actions[:length]),
            images={cam: np.stack([o["images"][cam] for o in observations]) for cam in observations[0]["images"]},
            seed=seed, success=True)

    def close(self) -> None:
        self.planner_env.close()
        self.target.close()


def generate_maniskill_demos(task: str, num_episodes: int, out_dir: str, *,
                             control_mode: str = "pd_ee_delta_pose", obs_mode: str = "rgb",
                             image_size: tuple[int, int] = (128, 128),
                             cameras: Sequence[str] = ("base_camera",), seed: int = 0,
                             max_steps: int = 200, max_attempts: int | None = None,
                             image_mode: str = "image", fps: int = 20, after_success: int = 0) -> DemoReport:
    """Generate `num_episodes` successful demos (seeds seed, seed+1, ...; failed seeds are skipped,
    at most `max_attempts` tried) and write them as a LeRobot v3.0 dataset to `out_dir`. Each keeps up
    to `after_success` of the planner's steps after its first success."""
    if num_episodes < 1:
        raise ValueError("num_episodes must be >= 1")
    cfg = ManiSkillConfig(task=task, control_mode=control_mode, obs_mode=obs_mode,
                          image_size=tuple(image_size), cameras=tuple(cameras), reward_mode="sparse")
    max_attempts = max_attempts or 2 * num_episodes + 5
    started = time.time()
    episodes: list[Episode] = []
    attempts = 0
    current = seed
    generator = DemoGenerator(cfg, max_steps, after_success)
    try:
        while len(episodes) < num_episodes:
            if attempts >= max_attempts:
                raise RuntimeError(f"{task}: only {len(episodes)}/{num_episodes} successful demos in "
                                   f"{attempts} attempts")
            episode = generator.episode(current)
            attempts += 1
            if episode is not None:
                episodes.append(episode)
                log.info("%s: demo %d/%d (seed %d, %d steps)", task, len(episodes), num_episodes, current,
                         len(episode.actions))
            current += 1
        spec = generator.spec
    finally:
        generator.close()
    extra = {"simulator": "maniskill3", "task": task, "control_mode": control_mode, "obs_mode": obs_mode,
             "seeds": [e.seed for e in episodes], "after_success": after_success, "source": "mani_skill motion planning, controller-converted"}
    write_lerobot_dataset(out_dir, episodes, fps, state_names=spec.state_names, robot_type="panda",
                          image_mode=image_mode, extra_info=extra)
    return DemoReport(out_dir=out_dir, episodes=len(episodes), attempts=attempts,
                      seeds=[int(e.seed) for e in episodes], lengths=[len(e.actions) for e in episodes],
                      seconds=round(time.time() - started, 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pirl demos", description="Generate ManiSkill demos as a LeRobot dataset")
    p.add_argument("--task", default="PickCube-v1")
    p.add_argument("--num-episodes", "-n", type=int, default=10)
    p.add_argument("--out", required=True, help="output dataset directory (must not hold a dataset)")
    p.add_argument("--control-mode", default="pd_ee_delta_pose",
                   choices=["pd_ee_delta_pose", "pd_ee_delta_pos", "pd_joint_delta_pos", "pd_joint_pos"])
    p.add_argument("--obs-mode", default="rgb", choices=["rgb", "state"])
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--cameras", nargs="+", default=["base_camera"])
    p.add_argument("--seed", type=int, default=0, help="first seed; episode seeds are consecutive")
    p.add_argument("--max-steps", type=int, default=200, help="longest episode kept")
    p.add_argument("--max-attempts", type=int, default=None)
    p.add_argument("--image-mode", default="image", choices=["image", "video"])
    p.add_argument("--fps", type=int, default=20)
    p.add_argument("--after-success", type=int, default=0,
                   help="planner steps kept after the first success (the motion to the exact goal)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = generate_maniskill_demos(
        args.task, args.num_episodes, args.out, control_mode=args.control_mode, obs_mode=args.obs_mode,
        image_size=tuple(args.image_size), cameras=args.cameras, seed=args.seed, max_steps=args.max_steps,
        max_attempts=args.max_attempts, image_mode=args.image_mode, fps=args.fps,
        after_success=args.after_success)
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
