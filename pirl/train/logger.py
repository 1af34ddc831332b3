"""Metrics to the console, to `metrics.jsonl` in the run directory, and optionally to wandb; progress
bars for long loops (RL iterations, SFT steps, evaluation episodes)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("pirl")

# The columns of the console line, in order (others go to the JSONL file and wandb only).
CONSOLE = [
    ("iteration", "it", "{:d}"), ("env_steps_total", "steps", "{:d}"), ("success_once", "succ", "{:.2f}"),
    ("replayed_envs", "replayed", "{:d}"), ("replayed_success", "their succ", "{:.2f}"),
    ("start_eval_success_rate", "eval of the start", "{:.2f}"), ("eval_success_rate", "eval", "{:.2f}"),
    ("return", "ret", "{:.2f}"), ("approx_kl", "kl", "{:.4f}"),
    ("clip_frac", "clip", "{:.2f}"), ("entropy", "ent", "{:.2f}"), ("explained_variance", "ev", "{:.2f}"),
    ("explore_std_raw", "explore", "{:.4f}"),
    ("env_steps_per_s", "sps", "{:.0f}"), ("time_rollout_s", "roll_s", "{:.1f}"), ("time_learn_s", "learn_s", "{:.1f}"),
    ("time_sync_s", "sync_s", "{:.2f}"),
]


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "it", leave: bool = True):
    """A tqdm bar on stderr. Shown on a terminal and hidden otherwise (logs, CI), unless PIRL_PROGRESS
    is 1 (always) or 0 (never). Log lines go above it inside `logging_redirect_tqdm()`."""
    from tqdm.auto import tqdm

    forced = os.environ.get("PIRL_PROGRESS")
    disable = None if forced is None else forced == "0"  # None: tqdm hides it when stderr is no TTY
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=disable,
                leave=leave)


def logging_redirect_tqdm():
    """Route the `pirl` logger's console lines through tqdm.write so that bars are not torn apart."""
    from tqdm.contrib.logging import logging_redirect_tqdm as redirect

    return redirect(loggers=[logging.root])


class MetricLogger:
    """One JSON line per record in `out_dir/metrics.jsonl`; a running `env_steps_total` is added.

    resume_at: the iteration a run goes on from (RL; 0 for a fresh run). The file is cut to the
    records before it (a run killed after its last checkpoint logged iterations it will repeat).
    None (the default) appends to the file as it is. env_steps_total: the count to go on from (a
    resumed run's, from its checkpoint's history)."""

    def __init__(self, out_dir: Path, use_wandb: bool = False, project: str = "pirl", config: dict | None = None,
                 resume_at: int | None = None, env_steps_total: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.env_steps_total = env_steps_total
        if resume_at is not None:
            kept = [r for r in _read_records(self.path) if int(r.get("iteration", -1)) < resume_at]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.wandb = None
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=project, dir=str(out_dir), config=config or {})

    def log(self, record: dict) -> None:
        self.env_steps_total += int(record.get("env_steps", 0))
        record = {**record, "env_steps_total": self.env_steps_total}
        self.file.write(json.dumps(record, default=float) + "\n")
        self.file.flush()
        parts = []
        for key, short, fmt in CONSOLE:
            value = record.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            parts.append(f"{short} {fmt.format(int(value) if fmt == '{:d}' else value)}")
        log.info(" | ".join(parts))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=self.env_steps_total)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _read_records(path: Path) -> list[dict]:
    """The complete JSON lines of a metrics file (a torn last line of a killed run is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
