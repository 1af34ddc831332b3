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
import re
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


def _given_keys(argv: list[str]) -> set[str]:
    """The config keys (dotted) and groups the command line sets."""
    return {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}


def _set_dotted(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _get_dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def _env_defaults(data: dict, given: set[str], recorded: dict) -> tuple[list[str], list[str]]:
    """Merges the recorded env settings into data["env"] below the command line's; returns the settings
    taken from `recorded` and the command line's settings that differ from it."""
    current = dict(data["env"])
    if "env" in given:  # another env group chosen: none of the recorded env applies
        return [], [f"env.{k}={current[k]} (recorded {v})" for k, v in recorded.items() if current.get(k, v) != v]
    same_sim = recorded.get("simulator", current.get("simulator")) == current.get("simulator")
    merged = {**(current if same_sim else {}), **recorded}
    for o in sorted(given):
        if o.startswith("env."):
            _set_dotted(merged, o[4:], _get_dotted(data["env"], o[4:]))
    data["env"] = merged
    applied = [f"env.{k}={merged[k]}" for k in recorded if f"env.{k}" not in given and current.get(k) != merged[k]]
    overridden = [f"env.{k}={merged[k]} (recorded {recorded[k]})" for k in recorded
                  if f"env.{k}" in given and merged[k] != recorded[k]]
    return applied, overridden


def rollout_defaults(command: str, data: dict, argv: list[str], rollout: dict, source: str, targets: dict[str, str]
                     ) -> list[str]:
    """Fills `data` with recorded rollout settings (`rollout`, as in a checkpoint's rollout.json: env,
    num_steps, n_exec, camera_map -> the config keys in `targets`) where the command line did not set
    them. Prints one line naming what came from `source` and, if any, one naming the command line's
    settings that differ from it (they win); returns the keys taken from `source`."""
    given = _given_keys(argv)
    applied: list[str] = []
    overridden: list[str] = []
    for key, dest in targets.items():
        if key not in rollout:
            continue
        if key == "env":
            taken, differing = _env_defaults(data, given, rollout["env"])
            applied, overridden = applied + taken, overridden + differing
        elif dest in given:
            if _get_dotted(data, dest) != rollout[key]:
                overridden.append(f"{dest}={_get_dotted(data, dest)} (recorded {rollout[key]})")
        else:
            if _get_dotted(data, dest) != rollout[key]:
                applied.append(f"{dest}={rollout[key]}")
            _set_dotted(data, dest, rollout[key])
    if applied:
        print(f"pirl {command}: from {source}: {', '.join(applied)}; set any on the command line to override")
    if overridden:
        print(f"pirl {command}: the command line differs from {source}: {', '.join(overridden)}")
    return applied


def checkpoint_defaults(command: str, data: dict, argv: list[str], checkpoint: str, targets: dict[str, str]
                        ) -> list[str]:
    """`rollout_defaults` from the checkpoint's recorded rollout settings (`vla.checkpoint.read_rollout`)."""
    from vla.checkpoint import read_rollout

    return rollout_defaults(command, data, argv, read_rollout(checkpoint),
                            f"{checkpoint}/rollout.json (the settings it was trained with)", targets)


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
    try:
        path = train_sft(cfg)
    finally:
        rank = leave_process_group()
    return report_and_end(path, rank)


def cmd_train(argv: list[str]) -> int:
    from pirl.train.rl import train

    result = train(compose_train(argv))
    history = result["history"]
    if history:
        first, last = history[0], history[-1]
        evals = [f"{h['eval_successes']}/{h['eval_episodes']}" for h in history if "eval_success_rate" in h]
        start = [f"{h['start_eval_successes']}/{h['start_eval_episodes']}" for h in history[:1]
                 if "start_eval_successes" in h]
        print(f"pirl train: {len(history)} iterations; rollout success_once {first['success_once']:.2f} -> "
              f"{last['success_once']:.2f}" + (f"; ODE evaluation: {' -> '.join(start + [', '.join(evals)])}"
                                                if evals else ""))
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
            raise SystemExit("pirl eval: critic= is only used with guidance= (e.g. guidance=qgf guidance.weight=10)")
        return None
    if not data.get("critic"):
        raise SystemExit(f"pirl eval: guidance={cfg.method} needs critic=DIR (a critic written by `pirl critic`)")
    critic = load_critic(resolve_path(data["critic"]), policy, device=next(policy.parameters()).device,
                         policy_checkpoint=checkpoint)
    return GuidedSampler(policy, critic, cfg, num_steps)


EVAL_ROLLOUT_KEYS = {"env": "env", "num_steps": "num_steps", "n_exec": "n_exec"}
"""Rollout setting -> `pirl eval` config key, for a served policy and a local checkpoint alike; a local one
also takes camera_map (a served one maps its cameras itself)."""


def remote_actor(data: dict, argv: list[str], url: str):
    """`pirl eval policy=ws://...`: a RemoteActor on the served policy, and the served checkpoint's rollout
    settings (metadata "rollout", num_steps the served K) filled into `data` by `rollout_defaults`, as a local
    eval takes its checkpoint's; returns the actor and the keys taken from the server."""
    from pirl.serve.client import RemoteActor
    from vla.checkpoint import validate_rollout

    if data["guidance"]["method"] != "none" or data.get("critic"):
        raise SystemExit("pirl eval: with policy=ws://... guidance runs on the server (pirl serve guidance=...)")
    actor = RemoteActor(url, api_key=data.get("api_key"), num_envs=data["num_envs"])
    meta = actor.metadata
    try:
        served_k = {"num_steps": meta["num_steps"]} if "num_steps" in meta else {}
        rollout = validate_rollout({**(meta.get("rollout") or {}), **served_k}, url)
        if "num_steps" in _given_keys(argv) and data["num_steps"] != rollout.get("num_steps", data["num_steps"]):
            raise SystemExit(f"pirl eval: num_steps={data['num_steps']}, but {url} samples with K="
                             f"{rollout['num_steps']}; K is the server's (pirl serve num_steps=...)")
        applied = rollout_defaults("eval", data, argv, rollout, f"{url} (the served checkpoint's rollout settings)",
                                   EVAL_ROLLOUT_KEYS)
        if meta.get("action_horizon", data["n_exec"]) < data["n_exec"]:
            raise SystemExit(f"pirl eval: n_exec={data['n_exec']} > the served action horizon "
                             f"{meta['action_horizon']}")
    except BaseException:
        actor.close()
        raise
    return actor, applied


def cmd_eval(argv: list[str]) -> int:
    import torch

    from pirl.config import check_device
    from pirl.train.common import graphs_on_gpu, set_precision
    from pirl.train.rl import make_env, processor_for
    from pirl.train.rl_core import Agent, PolicyActor, SamplerConfig, evaluate
    from vla.checkpoint import load_policy

    data = compose("eval", argv)
    guided = None
    remote = data.get("policy")
    if bool(remote) == bool(data["checkpoint"]):
        raise SystemExit("pirl eval: set exactly one of checkpoint=DIR or policy=ws://host:port")
    if not remote:
        check_device(data["device"], "device")
    checkpoint = resolve_path(data["checkpoint"]) if not remote else None
    if remote:  # the same episode loop; actions come from the server (pirl.serve.client.RemoteActor)
        actor, from_checkpoint = remote_actor(data, argv, remote)
    else:
        from_checkpoint = checkpoint_defaults("eval", data, argv, checkpoint,
                                              {**EVAL_ROLLOUT_KEYS, "camera_map": "camera_map"})
    default_out = (Path("runs") / "eval_remote" / remote.split("://")[-1].replace(":", "_").replace("/", "_")
                   if remote else Path(checkpoint) / "eval")
    env_section = dict(data["env"])
    if data["videos"]:
        out_dir = Path(data["output_dir"] or default_out)
        env_section.update(record_video_envs=list(range(min(data["videos"], data["num_envs"]))),
                           video_dir=str(out_dir / "videos"))
    agent = processor = None
    num_steps = data["num_steps"]
    if not remote:
        actor = None
        policy, _ = load_policy(checkpoint, device=data["device"])
        set_precision(policy, data["precision"], data["device"])
        graphs_on_gpu(policy)
        agent = Agent.build(policy, SamplerConfig(num_steps=num_steps))
        processor = processor_for(checkpoint, data["camera_map"])
        guided = guided_sampler(data, policy, processor, checkpoint, num_steps)
        if guided is not None:
            actor = PolicyActor(policy, processor, num_steps, sample=guided)
    horizon = actor.metadata["action_horizon"] if remote else policy.config.action_horizon
    prefetch = data["prefetch_steps"]
    if not 0 <= prefetch <= data["n_exec"] or data["n_exec"] + prefetch > horizon:
        raise SystemExit(f"pirl eval: prefetch_steps={prefetch} must be in [0, n_exec={data['n_exec']}] with "
                         f"n_exec + prefetch_steps <= the chunk's {horizon} actions")
    from pirl.serve.inputs import MAX_BETA

    beta = data["inpaint_beta"]
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= MAX_BETA):
        raise SystemExit(f"pirl eval: inpaint_beta must be a number in (0, {MAX_BETA:g}] or null (the default 5), "
                         f"got {beta!r}")
    if data["inpaint"] and (guided is not None or remote and actor.metadata.get("sampler") == "guided"):
        raise SystemExit("pirl eval: inpaint=true (real-time chunking) runs with the plain sampler, not with guidance")
    env = make_env(env_section, data["num_envs"], data["seed"])
    try:
        with torch.no_grad():
            result = evaluate(agent, processor, env, data["episodes"], data["n_exec"], num_steps, data["seed"],
                              actor=actor, prefetch_steps=prefetch, inpaint=data["inpaint"],
                              inpaint_beta=data["inpaint_beta"])
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
               "n_exec": data["n_exec"], "prefetch_steps": prefetch, "inpaint": data["inpaint"],
               "inpaint_beta": data["inpaint_beta"],
               "max_episode_steps": env_section.get("max_episode_steps"),
               "defaults_from_checkpoint": from_checkpoint,
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
    if prefetch:
        table += (f"\nprefetch_steps={prefetch}: every chunk after an episode's first was computed from the observation "
                  f"{prefetch} step{'s' if prefetch > 1 else ''} before the previous one ended (`pirl.serve.broker.ActionChunkBroker`).\n")
    if data["inpaint"]:
        table += (f"\ninpaint: each new chunk steered onto the previous chunk's remaining actions (real-time chunking, "
                  f"beta {data['inpaint_beta'] if data['inpaint_beta'] is not None else 'the default'}).\n")
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
        raise SystemExit(f"pirl import: {args.source} has no norm stats (no assets/*/norm_stats.json, norm_stats.json "
                         "or LeRobot policy_preprocessor.json); a policy needs them to act")
    tok = Path(args.tokenizer)
    save_policy(args.dest, policy, stats, tokenizer_file=tok / "tokenizer.model" if tok.is_dir() else tok,
                metadata={"imported_from": str(args.source), "format": report.format,
                          "unused_weights": report.unused_keys})
    print(f"pirl import: {report.format} checkpoint -> {args.dest}; norm stats from {report.norm_stats_file}; "
          f"image resize antialias={policy.config.image_resize_antialias} (as {report.format}); "
          f"unused weights dropped: {report.unused_keys}")
    return 0


def cmd_collect(argv: list[str]) -> int:
    from pirl.collect import CollectConfig, collect
    from pirl.config import load_section

    data = compose("collect", argv)
    data["checkpoint"] = resolve_path(data["checkpoint"])
    checkpoint_defaults("collect", data, argv, data["checkpoint"],
                        {"env": "env", "num_steps": "sampler.num_steps", "n_exec": "n_exec", "camera_map": "camera_map"})
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
    finally:
        rank = leave_process_group()
    return report_and_end(out, rank)


def leave_process_group() -> int | None:
    """A torchrun / accelerate rank that exits with gloo's threads still alive can abort at interpreter
    shutdown ("terminate called without an active exception"): leave the group before exiting. Returns
    this process's rank in the group it left (None: it was in none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        return rank
    return None


def report_and_end(output, rank: int | None) -> int:
    """The last step of a command that may run as one rank of several (`pirl sft`, `pirl critic`): the
    output path printed once (one process, or the main rank: ranks printing together interleave their
    lines), then exit status 0, through `end_rank` for a rank."""
    if not rank:
        print(output)
    return 0 if rank is None else end_rank(0)


def end_rank(code: int) -> int:
    """Ends a data-parallel rank whose work is done and saved, after `leave_process_group`: output flushed,
    then `os._exit`, because gloo's C++ destructors can still abort a rank at interpreter shutdown after
    it left the group (seen in the two-process SFT and critic tests under load). Skips atexit handlers;
    pirl registers none, and its checkpoints are written atomically before this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def cmd_serve(argv: list[str]) -> int:
    from pirl.config import load_section
    from pirl.serve.config import ServeConfig
    from pirl.serve.server import run

    data = compose("serve", argv)
    data["checkpoint"] = resolve_path(data["checkpoint"])
    checkpoint_defaults("serve", data, argv, data["checkpoint"], {"num_steps": "num_steps"})
    if data["inputs"] == "pirl" and "camera_map" not in _given_keys(argv):  # model camera -> request key
        from vla.checkpoint import read_rollout

        cameras = read_rollout(data["checkpoint"]).get("camera_map") or {}
        data["camera_map"] = data["camera_map"] or {m: f"images/{e}" for m, e in cameras.items()}
    if data.get("critic"):
        data["critic"] = resolve_path(data["critic"])
    logging.getLogger("websockets").setLevel(logging.WARNING)
    return run(load_section(ServeConfig, data))


COMMANDS = {"demos": cmd_demos, "sft": cmd_sft, "train": cmd_train, "eval": cmd_eval, "import": cmd_import,
            "collect": cmd_collect, "critic": cmd_critic,
            "serve": cmd_serve}


class UserError(SystemExit):
    """A mistake in what the user asked for: its one-line message was printed; exit status 2.
    (str(err) is the message, `code` is 2.)"""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


# Config file name of each Hydra command (for the list of valid keys).
_HYDRA_CONFIGS = {"sft": "sft", "train": "train", "eval": "eval", "collect": "collect", "critic": "critic",
                  "serve": "serve"}


def _valid_keys(command: str) -> list[str]:
    """Every dotted key of the command's composed default config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = hydra_compose(config_name=_HYDRA_CONFIGS[command], overrides=[])
    data = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    keys: list[str] = []

    def walk(node, prefix):
        for k, v in node.items():
            keys.append(prefix + str(k))
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
    walk(data, "")
    return keys


def _closest(word: str, choices: list[str]) -> str:
    import difflib

    last = {c: c.rsplit(".", 1)[-1] for c in choices}
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    close += [c for c in difflib.get_close_matches(word.rsplit(".", 1)[-1], list(set(last.values())), n=3, cutoff=0.6)
              for c in [next(k for k, v in last.items() if v == c)] if c not in close]
    return f"; did you mean {' or '.join(close[:3])}?" if close else ""


def user_error_line(command: str, err: BaseException) -> str | None:
    """One line (what is wrong, where, how to fix it) for a mistake of the user's; None for a bug."""
    import errno

    text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    hydra_type = type(err).__module__.split(".")[0] in ("hydra", "omegaconf")
    if isinstance(err, UserError):
        return None
    if isinstance(err, SystemExit):
        if not isinstance(err.code, str):
            return None
        text = " ".join(err.code.split())
    elif hydra_type:
        missing_option = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", str(err))
        bad_key = (re.search(r"Could not override '([^']+)'", str(err))
                   or re.search(r"Key '([^']+)' is not in struct", str(err)))
        if missing_option:
            group, option = missing_option.groups()
            options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
            text = f"unknown {group} option {option!r}; choose one of {options} (configs/{group}/)"
        elif bad_key and command in _HYDRA_CONFIGS:
            key = bad_key.group(1)
            if key in _valid_keys(command):  # a key of the default option of its group, not of the chosen one
                text = (f"{key!r} is not set by the {key.split('.')[0]} option chosen here (its default option has"
                        f" it); add it with +{key}=... or drop it")
            else:
                text = (f"unknown config key {key!r}{_closest(key, _valid_keys(command))} "
                        f"(`pirl {command} --help` lists the keys)")
        else:
            text = f"bad command-line override: {' '.join(str(err).split())}"
    elif isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        text = f"{text}; pick another port= (port=0 takes a free one)"
    elif isinstance(err, OSError) and isinstance(err, FileNotFoundError | FileExistsError | NotADirectoryError |
                                                 IsADirectoryError | PermissionError):
        if err.filename and not text.startswith(("checkpoint", "critic", "collect")):
            text = f"{err.strerror}: {err.filename}" if err.strerror else text
    elif isinstance(err, ValueError | KeyError):
        if getattr(err, "one_line", None):
            text = err.one_line
        unknown = re.match(r"unknown config key\(s\)(?: in (\S+))?: \[(.*?)\]; valid keys: \[(.*)\]", text)
        if unknown:
            where = unknown.group(1) or ""
            names = [n.strip(" '") for n in unknown.group(2).split(",")]
            valid = [where + n.strip(" '") for n in unknown.group(3).split(",")]
            text = (f"unknown config key {where + names[0]!r}{_closest(where + names[0], valid)} "
                    f"(`pirl {command} --help` lists the keys)")
    else:
        return None
    return text if text.startswith("pirl ") else f"pirl {command}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user mistake prints one line on stderr and raises `UserError` (exit status 2);
    PIRL_DEBUG=1 re-raises the original exception instead (its traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"pirl: unknown command {argv[0]!r}; one of {sorted(COMMANDS)}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command in _HYDRA_CONFIGS and any(a in ("-h", "--help") for a in rest):
        from pirl.cli_help import command_help

        print(command_help(command))
        return 0
    _setup_logging()
    try:
        return COMMANDS[command](rest)
    except (Exception, SystemExit) as err:
        line = user_error_line(command, err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        if os.environ.get("PIRL_DEBUG"):
            raise
        raise UserError(line) from None


if __name__ == "__main__":
    sys.exit(main())
