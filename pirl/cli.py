"""`pirl` command line: demos | sft | train | eval | import | collect | critic | serve.

    pirl demos --task PickCube-v1 -n 200 --obs-mode state --out data/pickcube     (argparse flags)
    pirl sft dataset=data/pickcube steps=3000                                      (Hydra overrides)
    pirl train experiment=maniskill_pickcube_tiny run.iterations=10
    pirl eval checkpoint=runs/.../checkpoints/iter_000029 episodes=50
    pirl eval policy=ws://127.0.0.1:8000 episodes=50                              (against a served policy)
    pirl import SRC DST --model pi0 --tokenizer DIR                                (openpi / LeRobot -> pirl)
    pirl collect checkpoint=DIR env=maniskill_pickcube_state episodes=64 out=data/rollouts
    pirl critic checkpoint=DIR data=data/rollouts [data=data/pickcube] out=runs/critic
    pirl serve checkpoint=DIR port=8000 [max_batch=16 api_key=...]                 (openpi websocket server)

Configs live in the repository's configs/ (Hydra). Every key ends in a typed dataclass field: an
unknown or misspelt key stops the command with the list of valid keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only inside the command that needs them
    from pirl.train.rl import RLConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

log = logging.getLogger("pirl")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "offline")


def compose(config_name: str, overrides: list[str]) -> dict:
    """Hydra compose of configs/<config_name>.yaml with command-line overrides, as plain data."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SystemExit(f"pirl: required config value(s) not set: {missing} (pass e.g. {missing[0]}=...)")
    return OmegaConf.to_container(cfg, resolve=True)


def resolve_path(path: str | None) -> str | None:
    """Relative paths that do not exist from the working directory are tried from the repository."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = REPO / path
    return str(candidate) if candidate.exists() else path


def compose_train(overrides: list[str]) -> RLConfig:
    """The `pirl train` config for these Hydra overrides, with its file paths (the initial checkpoint,
    the toy env's state statistics) resolved as `resolve_path` does: what the CLI, tests and bench run."""
    from pirl.train.rl import RLConfig

    data = compose("train", overrides)
    data["run"]["init_checkpoint"] = resolve_path(data["run"].get("init_checkpoint"))
    if data.get("env", {}).get("state_stats"):
        data["env"]["state_stats"] = resolve_path(data["env"]["state_stats"])
    return RLConfig.from_dict(data)


def cmd_demos(argv: list[str]) -> int:
    from envs.demos import main as demos_main

    return demos_main(argv)


def cmd_sft(argv: list[str]) -> int:
    from pirl.config import load_section
    from pirl.train.sft import SFTConfig, train_sft

    data = compose("sft", argv)
    cfg = load_section(SFTConfig, data)
    path = train_sft(cfg)
    print(path)
    return 0


def cmd_train(argv: list[str]) -> int:
    from pirl.train.rl import train

    result = train(compose_train(argv))
    history = result["history"]
    if history:
        first, last = history[0], history[-1]
        evals = [h["eval_success_rate"] for h in history if "eval_success_rate" in h]
        print(f"pirl train: {len(history)} iterations; rollout success_once {first['success_once']:.2f} -> "
              f"{last['success_once']:.2f}" + (f"; eval success {evals[0]:.2f} -> {evals[-1]:.2f}" if evals else ""))
    print(f"pirl train: outputs in {result['output_dir']}")
    return 0


def guided_sampler(data: dict, policy, processor, checkpoint: str, num_steps: int):
    """The eval config's guidance section -> a `pirl.guidance.GuidedSampler` (None for method none)."""
    from pirl.critic.q import load_critic
    from pirl.guidance.actor import GuidedSampler, guidance_config

    action_mode = processor.norm_stats["actions"].resolved_mode(processor.norm_mode)
    cfg = guidance_config(data["guidance"], action_mode)
    if cfg.method == "none":
        if data.get("critic"):
            raise SystemExit("pirl eval: critic= is only used with guidance= (e.g. guidance=qgf guidance.weight=0.1)")
        return None
    if not data.get("critic"):
        raise SystemExit(f"pirl eval: guidance={cfg.method} needs critic=DIR (a critic written by `pirl critic`)")
    critic = load_critic(resolve_path(data["critic"]), policy, policy_checkpoint=checkpoint)
    return GuidedSampler(policy, critic, cfg, num_steps)


def cmd_eval(argv: list[str]) -> int:
    import torch

    from pirl.train.rl import make_env, processor_for
    from pirl.train.rl_core import Agent, PolicyActor, SamplerConfig, evaluate
    from vla.checkpoint import load_policy

    data = compose("eval", argv)
    guided = None
    remote = data.get("policy")
    if bool(remote) == bool(data["checkpoint"]):
        raise SystemExit("pirl eval: set exactly one of checkpoint=DIR or policy=ws://host:port")
    checkpoint = resolve_path(data["checkpoint"]) if not remote else None
    default_out = (Path("runs") / "eval_remote" / remote.split("://")[-1].replace(":", "_").replace("/", "_")
                   if remote else Path(checkpoint) / "eval")
    env_section = dict(data["env"])
    if data["videos"]:
        out_dir = Path(data["output_dir"] or default_out)
        env_section.update(record_video_envs=list(range(min(data["videos"], data["num_envs"]))),
                           video_dir=str(out_dir / "videos"))
    agent = processor = actor = None
    num_steps = data["num_steps"]
    if remote:  # the same episode loop; actions come from the server (pirl.serve.client.RemoteActor)
        from pirl.serve.client import RemoteActor

        if data["guidance"]["method"] != "none" or data.get("critic"):
            raise SystemExit("pirl eval: with policy=ws://... guidance runs on the server (pirl serve guidance=...)")
        actor = RemoteActor(remote, api_key=data.get("api_key"), num_envs=data["num_envs"])
        num_steps = actor.metadata.get("num_steps", num_steps)
        if actor.metadata.get("action_horizon", data["n_exec"]) < data["n_exec"]:
            raise SystemExit(f"pirl eval: n_exec={data['n_exec']} > the served action horizon "
                             f"{actor.metadata['action_horizon']}")
    else:
        policy, _ = load_policy(checkpoint)
        agent = Agent.build(policy, SamplerConfig(num_steps=num_steps))
        processor = processor_for(checkpoint, data["camera_map"])
        guided = guided_sampler(data, policy, processor, checkpoint, num_steps)
        if guided is not None:
            actor = PolicyActor(policy, processor, num_steps, sample=guided)
    env = make_env(env_section, data["num_envs"], data["seed"])
    try:
        with torch.no_grad():
            result = evaluate(agent, processor, env, data["episodes"], data["n_exec"], num_steps, data["seed"],
                              actor=actor)
    finally:
        env.close()
        if remote:
            actor.close()
    out_dir = Path(data["output_dir"] or default_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = env_section.get("task") or env_section.get("suite")
    summary = {"checkpoint": str(checkpoint) if not remote else actor.metadata.get("checkpoint"),
               "policy": remote, "task": task, "episodes": result["episodes"],
               "successes": result["successes"], "success_rate": result["success_rate"],
               "success_ci95": result["success_ci95"], "mean_return": result["mean_return"],
               "mean_length": result["mean_length"], "seed": data["seed"], "num_steps": num_steps,
               "guidance": data["guidance"], "critic": data.get("critic"),
               "guidance_cost": guided.totals.per_chunk() if guided is not None else None,
               "guidance_ratio_per_step": guided.totals.ratio_median_per_step if guided is not None else None}
    (out_dir / "results.json").write_text(json.dumps({**summary, "per_episode": result["per_episode"]}, indent=2))
    low, high = result["success_ci95"]
    g = data["guidance"]
    method = g["method"] + (f" w={g['weight']}" if "weight" in g else "") + (f" N={g['n']}" if "n" in g else "")
    cost = f"{guided.totals.per_chunk()['ms_per_chunk']:.1f}" if guided is not None else "-"
    table = ("| task | seeds | K | guidance | ms/chunk | success | 95% interval | mean return | mean length |\n"
             "|---|---|---|---|---|---|---|---|---|\n"
             f"| {task} | {data['seed']}..{data['seed'] + result['episodes'] - 1} | {num_steps} | {method} | {cost} | "
             f"{result['successes']}/{result['episodes']} = {result['success_rate']:.3f} | [{low:.2f}, {high:.2f}] | "
             f"{result['mean_return']:.3f} | {result['mean_length']:.1f} |\n")
    (out_dir / "results.md").write_text(table)
    print(table)
    print(f"pirl eval: wrote {out_dir / 'results.json'}")
    return 0


def cmd_import(argv: list[str]) -> int:
    from pirl.train.common import build_model_config
    from vla.checkpoint import import_checkpoint, save_policy

    p = argparse.ArgumentParser(prog="pirl import", description="openpi / LeRobot / transformers π0 -> pirl policy")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--model", required=True, help="preset (pi0, pi05, ...) or model YAML")
    p.add_argument("--tokenizer", required=True, help="PaliGemma tokenizer.model (file or directory)")
    p.add_argument("--asset-id", default=None, help="which assets/<id>/norm_stats.json to take")
    args = p.parse_args(argv)
    policy, stats, report = import_checkpoint(args.source, build_model_config(args.model), asset_id=args.asset_id)
    if stats is None:
        raise SystemExit(f"{args.source} has no norm stats; a policy needs them to act")
    tok = Path(args.tokenizer)
    save_policy(args.dest, policy, stats, tokenizer_file=tok / "tokenizer.model" if tok.is_dir() else tok,
                metadata={"imported_from": str(args.source), "format": report.format,
                          "unused_weights": report.unused_keys})
    print(f"pirl import: {report.format} checkpoint -> {args.dest}; unused weights dropped: {report.unused_keys}")
    return 0


def cmd_collect(argv: list[str]) -> int:
    from pirl.collect import CollectConfig, collect
    from pirl.config import load_section

    data = compose("collect", argv)
    data["checkpoint"] = resolve_path(data["checkpoint"])
    try:
        summary = collect(load_section(CollectConfig, data))
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"pirl {err}" if str(err).startswith("collect:") else f"pirl collect: {err}") from None
    print(json.dumps(summary))
    return 0


def cmd_critic(argv: list[str]) -> int:
    from pirl.config import load_section
    from pirl.critic.train import CriticTrainConfig, train_critic

    # `data=A data=B` (repeated) or `data=[A,B]`: one list of dataset roots.
    roots = [a.split("=", 1)[1] for a in argv if a.startswith("data=") and not a.startswith("data=[")]
    argv = [a for a in argv if not (a.startswith("data=") and not a.startswith("data=["))]
    if roots:
        argv.append(f"data=[{','.join(roots)}]")
    data = compose("critic", argv)
    data["checkpoint"] = resolve_path(data["checkpoint"])
    data["data"] = [resolve_path(d) for d in data["data"]]
    try:
        out = train_critic(load_section(CriticTrainConfig, data))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"pirl {err}" if str(err).startswith("critic:") else f"pirl critic: {err}") from None
    print(out)
    return 0


def cmd_serve(argv: list[str]) -> int:
    from pirl.config import load_section
    from pirl.serve.config import ServeConfig
    from pirl.serve.server import run

    data = compose("serve", argv)
    data["checkpoint"] = resolve_path(data["checkpoint"])
    if data.get("critic"):
        data["critic"] = resolve_path(data["critic"])
    logging.getLogger("websockets").setLevel(logging.WARNING)
    return run(load_section(ServeConfig, data))


COMMANDS = {"demos": cmd_demos, "sft": cmd_sft, "train": cmd_train, "eval": cmd_eval, "import": cmd_import,
            "collect": cmd_collect, "critic": cmd_critic,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
