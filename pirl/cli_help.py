"""`pirl <command> --help`: usage, config groups and their options, the main keys with their docs.

Built from what the configs already say, without importing torch or composing with Hydra: the
command's YAML (configs/<command>.yaml: defaults list, keys, trailing comments), the options of each
config group (configs/<group>/*.yaml), and the attribute docstrings of the dataclass fields the keys
end in (read with `ast` from the source file).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# command -> (summary, usage lines, examples, [(key prefix, source file, dataclass)])
COMMANDS: dict[str, tuple[str, list[str], list[str], list[tuple[str, str, str]]]] = {
    "sft": ("flow-matching behaviour cloning of a π0 / π0.5 policy on a LeRobot dataset",
            ["pirl sft dataset=DIR [model=NAME] [key=value ...]"],
            ["pirl sft dataset=data/pickcube model=tiny_maniskill_state steps=3000",
             "pirl sft dataset=data/pickcube init_checkpoint=assets/pickcube_tiny_sft_v3 steps=500 "
             "'rollout={env:{max_episode_steps:100},num_steps:4,n_exec:5}'"],
            [("", "pirl/train/sft.py", "SFTConfig")]),
    "train": ("online RL fine-tuning (PPO / GRPO with Flow-SDE or Flow-Noise exploration)",
              ["pirl train [experiment=NAME] [section.key=value ...]"],
              ["pirl train experiment=maniskill_pickcube_tiny run.iterations=10",
               "pirl train experiment=maniskill_pickcube_tiny sampler.a_noise=0.3 run.output_dir=runs/a03",
               "pirl train run.resume=runs/rl/checkpoints/iter_000009 experiment=maniskill_pickcube_tiny"],
              [("run.", "pirl/train/rl.py", "RunConfig"), ("sampler.", "pirl/train/rl_core.py", "SamplerConfig"),
               ("optim.", "pirl/train/rl_core.py", "OptimConfig"), ("cluster.", "pirl/train/rl.py", "ClusterConfig")]),
    "eval": ("evaluate a policy (ODE sampling on fixed seeds, optionally with test-time guidance)",
             ["pirl eval checkpoint=DIR [key=value ...]", "pirl eval policy=ws://HOST:PORT [key=value ...]"],
             ["pirl eval checkpoint=assets/pickcube_tiny_sft_v3 episodes=64",
              "pirl eval checkpoint=assets/pickcube_tiny_sft_v3 num_steps=10 env.max_episode_steps=50",
              "pirl eval checkpoint=DIR guidance=qgf guidance.weight=10 critic=DIR_critic   (w chosen by bench/guidance.py)"],
             []),
    "collect": ("run a policy and write what happened as a LeRobot dataset (rewards, dones, chunk starts)",
                ["pirl collect checkpoint=DIR out=DIR [key=value ...]"],
                ["pirl collect checkpoint=assets/pickcube_tiny_sft_v3 episodes=64 out=data/rollouts",
                 "pirl collect checkpoint=DIR out=data/ode ode=true"],
                [("", "pirl/collect.py", "CollectConfig"), ("sampler.", "pirl/train/rl_core.py", "SamplerConfig")]),
    "critic": ("fit the chunked Q critic of QGF on a policy's frozen features",
               ["pirl critic checkpoint=DIR data=DIR [data=DIR ...] [key=value ...]"],
               ["pirl critic checkpoint=assets/pickcube_tiny_sft_v3 data=data/rollouts data=data/pickcube "
                "out=runs/critic"],
               [("", "pirl/critic/train.py", "CriticTrainConfig")]),
    "serve": ("serve a policy over openpi's websocket protocol (dynamic batching)",
              ["pirl serve checkpoint=DIR [key=value ...]"],
              ["pirl serve checkpoint=assets/pickcube_tiny_sft_v3 port=8000",
               "pirl serve checkpoint=DIR host=0.0.0.0 api_key=SECRET inputs=libero max_batch=32"],
              [("", "pirl/serve/config.py", "ServeConfig")]),
}

CHECKPOINT_DEFAULTS = {
    "eval": "env (task, max_episode_steps, ...), num_steps, n_exec, camera_map",
    "collect": "env (task, max_episode_steps, ...), sampler.num_steps, n_exec, camera_map",
    "serve": "num_steps, camera_map",
}


def field_docs(source: str, class_name: str) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field)."""
    tree = ast.parse((REPO / source).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            docs, body = {}, node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(
                            nxt.value.value, str):
                        docs[stmt.target.id] = " ".join(nxt.value.value.split())
                    else:
                        docs[stmt.target.id] = ""
            return docs
    return {}


def yaml_keys(path: Path, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value as written, trailing comment) of a config file, sections flattened."""
    out, stack = [], []
    for line in path.read_text().splitlines():
        m = re.match(r"^( *)([A-Za-z_][\w]*):(?:\s+(.*?))?\s*$", line.split(" #")[0] if " #" in line else line)
        if not m or line.lstrip().startswith("#") or m.group(2) == "defaults":
            continue
        indent = len(m.group(1)) // 2
        stack = stack[:indent] + [m.group(2)]
        comment = line.split(" # ", 1)[1].strip() if " # " in line else ""
        value = (m.group(3) or "").strip()
        if value:
            out.append((prefix + ".".join(stack), value, comment))
        elif comment:
            out.append((prefix + ".".join(stack), "", comment))
    return [k for k in out if not k[0].startswith("defaults")]


def groups(config: str) -> list[tuple[str, str | None, list[str]]]:
    """(group, default option, every option) of a command's defaults list."""
    data = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text()) or {}
    out = []
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            (group, default), = entry.items()
            group = group.replace("override ", "").strip("/")
            options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
            out.append((group, default, options))
    return out


def _wrap(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def command_help(command: str) -> str:
    summary, usage, examples, classes = COMMANDS[command]
    lines = [f"pirl {command}: {summary}", "", "usage:"]
    lines += [f"  {u}" for u in usage]
    lines += ["", "Arguments are Hydra overrides (key=value, section.key=value, GROUP=OPTION); an unknown key "
              "is an error."]
    found = groups(command)
    if found:
        lines += ["", "config groups (GROUP=OPTION; configs/GROUP/OPTION.yaml):"]
        for group, default, options in found:
            shown = " | ".join(f"{o} (default)" if o == default else o for o in options)
            lines.append(f"  {group:<10} {shown}")
    docs: dict[str, str] = {}
    for prefix, source, cls in classes:
        docs.update({prefix + k: v for k, v in field_docs(source, cls).items()})
    keys = yaml_keys(CONFIGS / f"{command}.yaml")
    listed = {k for k, _, _ in keys}
    lines += ["", "keys (default; doc):"]
    width = max([len(k) for k, _, _ in keys] + [10])
    for key, value, comment in keys:
        doc = comment or docs.get(key, "")
        lines.append(_wrap(f"  {key:<{width}}  {value or '-'}" + (f"   {doc}" if doc else "")))
    extra = [(k, d) for k, d in docs.items() if k not in listed and d and "." in k and k.split(".")[0] in
             ("run", "sampler")]
    if extra:
        lines += ["", "more keys (dataclass defaults):"]
        width = max(len(k) for k, _ in extra)
        lines += [_wrap(f"  {k:<{width}}  {d}") for k, d in extra]
    if command in CHECKPOINT_DEFAULTS:
        lines += ["", f"Defaults from the checkpoint: {CHECKPOINT_DEFAULTS[command]} come from the checkpoint's "
                  "rollout.json (the settings it was trained with) unless given on the command line."]
        if command == "eval":
            lines.append("With policy=ws://HOST:PORT they come from the served checkpoint (the server's metadata); "
                         "K is the server's.")
    lines += ["", "examples:"] + [f"  {e}" for e in examples]
    lines += ["", "A mistake stops the command with one line on stderr and exit status 2; PIRL_DEBUG=1 shows the "
              "traceback (docs/errors.md)."]
    return "\n".join(lines)
