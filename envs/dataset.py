"""LeRobot-format datasets without the lerobot package: a v3.0 writer, a v2.x/v3.0 reader, SFT
batches of action chunks with padding masks, and normalisation stats.

Layout written (LeRobot v3.0, https://huggingface.co/docs/lerobot "LeRobotDataset v3"):
    meta/info.json                         schema (features), fps, counts, path templates
    meta/stats.json                        per feature mean/std/min/max/q01/q99/count
    meta/tasks.parquet                     index: task (the prompt), column task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode: episode_index, tasks, length,
                                           dataset_from_index, dataset_to_index, data/..., videos/...
    data/chunk-000/file-000.parquet        one row per frame: observation.state, action,
                                           [observation.images.<cam> as {bytes: PNG, path}],
                                           timestamp, frame_index, episode_index, index, task_index,
                                           [RL columns, when the episodes carry them (`pirl collect`):
                                           next.reward, next.terminated, next.truncated, next.done,
                                           next.success (after action t), chunk_start (action t is
                                           the first of a policy chunk)]
    videos/observation.images.<cam>/chunk-000/file-000.mp4   (image_mode="video": all episodes
                                           concatenated; an episode's frames start at
                                           videos/<key>/from_timestamp)
Read: the above, and v2.0/v2.1 (meta/episodes.jsonl, meta/tasks.jsonl, one parquet per episode,
videos/chunk-XXX/<key>/episode_XXXXXX.mp4), e.g. LIBERO converted by openpi (keys image,
wrist_image, state, actions).
"""
from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


# ---------------------------------------------------------------------------------------------
# Normalisation stats
# ---------------------------------------------------------------------------------------------
def compute_stats(values: np.ndarray) -> dict[str, list[float]]:
    """Per-dim stats of a [N, D] array: mean, std, min, max, q01, q99 (exact quantiles), count."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    if len(values) == 0:
        raise ValueError("compute_stats: no values")
    out = {
        "mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0),
        "q01": np.quantile(values, 0.01, axis=0), "q99": np.quantile(values, 0.99, axis=0),
    }
    stats = {k: v.astype(float).tolist() for k, v in out.items()}
    stats["count"] = [int(len(values))]
    return stats


# ---------------------------------------------------------------------------------------------
# Writer (v3.0)
# ---------------------------------------------------------------------------------------------
# Optional per-step RL columns: Episode field -> (parquet column, dtype). Step t's values describe
# what happened *after* action t (LeRobot's "next." convention).
STEP_COLUMNS = {
    "rewards": ("next.reward", np.float32),
    "terminated": ("next.terminated", np.bool_),
    "truncated": ("next.truncated", np.bool_),
    "step_success": ("next.success", np.bool_),
    "chunk_start": ("chunk_start", np.bool_),
}


@dataclass
class Episode:
    """One episode: frame t holds the observation before action t.

    Demos carry only observations and actions. RL data (`pirl collect`) also carries, per step t,
    the reward, termination, truncation (time limit) and success after action t, which actions
    started a policy chunk, and the observation after the last action (`final_state`), which a
    critic needs to bootstrap an episode cut by the time limit.
    """

    prompt: str
    state: np.ndarray                      # [T, S] float32
    actions: np.ndarray                    # [T, D] float32, raw env units
    images: dict[str, np.ndarray] = field(default_factory=dict)  # cam -> [T, H, W, 3] uint8
    seed: int | None = None
    success: bool = True
    rewards: np.ndarray | None = None      # [T] float32 reward of step t
    terminated: np.ndarray | None = None   # [T] bool: step t ended the episode (task success/failure)
    truncated: np.ndarray | None = None    # [T] bool: step t ended it by the time limit (not a termination)
    step_success: np.ndarray | None = None  # [T] bool: the task counted as solved after step t
    chunk_start: np.ndarray | None = None  # [T] bool: action t is the first executed action of a chunk
    final_state: np.ndarray | None = None  # [S] float32: the observation after the last action

    def __post_init__(self):
        self.state = np.asarray(self.state, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        length = len(self.actions)
        if self.state.shape[0] != length:
            raise ValueError(f"episode: {self.state.shape[0]} states for {length} actions")
        for name, (_, dtype) in STEP_COLUMNS.items():
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=dtype).reshape(-1)
                if len(value) != length:
                    raise ValueError(f"episode {name}: {len(value)} values for {length} actions")
                setattr(self, name, value)
        if self.final_state is not None:
            self.final_state = np.asarray(self.final_state, dtype=np.float32).reshape(-1)
            if self.final_state.shape[0] != self.state.shape[1]:
                raise ValueError(f"episode final_state: {self.final_state.shape[0]} dims, "
                                 f"state has {self.state.shape[1]}")
        for cam, frames in self.images.items():
            if frames.shape[0] != length or frames.ndim != 4 or frames.dtype != np.uint8:
                raise ValueError(f"episode camera {cam}: frames {frames.shape} {frames.dtype}, want [{length}, H, W, 3] uint8")


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode_image(cell: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is None and path:
            with open(path, "rb") as f:
                data = f.read()
    else:
        data = cell
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_lerobot_dataset(root: str, episodes: Sequence[Episode], fps: int, *,
                          state_names: Sequence[str] | None = None,
                          action_names: Sequence[str] | None = None,
                          robot_type: str | None = None, image_mode: str = "image",
                          extra_info: dict | None = None) -> dict:
    """Write episodes as a LeRobot v3.0 dataset (one data file, one episodes file). Returns info."""
    if image_mode not in ("image", "video"):
        raise ValueError("image_mode: image | video")
    if not episodes:
        raise ValueError("write_lerobot_dataset: no episodes")
    if os.path.exists(os.path.join(root, "meta", "info.json")):
        raise FileExistsError(f"{root} already holds a dataset")
    step_fields = _check_episodes(episodes)
    cams = list(episodes[0].images)
    tasks = sorted({ep.prompt for ep in episodes})
    img_key = {cam: f"observation.images.{cam}" for cam in cams}
    columns, ep_rows = _frame_columns(episodes, fps, image_mode, img_key, step_fields, tasks)
    arrays = _write_data(root, episodes, columns, img_key, step_fields, fps, image_mode)
    _write_episodes_meta(root, episodes, ep_rows, tasks)
    features = _features(episodes, arrays, img_key, step_fields, fps, image_mode, state_names, action_names)
    info = {
        "codebase_version": "v3.0",
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": sum(len(ep.actions) for ep in episodes),
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": ("videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
                       if image_mode == "video" and cams else None),
        "features": features,
    }
    if extra_info:
        info["pirl"] = extra_info
    with open(os.path.join(root, "meta", "info.json"), "w") as f:  # last: its presence marks a complete dataset
        json.dump(info, f, indent=4)
    return info


def _check_episodes(episodes: Sequence[Episode]) -> list[str]:
    """Same cameras and sizes everywhere, optional per-step fields set in all episodes or none;
    returns the per-step fields present."""
    cams = list(episodes[0].images)
    state_dim, action_dim = episodes[0].state.shape[1], episodes[0].actions.shape[1]
    for ep in episodes:
        if list(ep.images) != cams or ep.state.shape[1] != state_dim or ep.actions.shape[1] != action_dim:
            raise ValueError("all episodes need the same cameras, state and action sizes")
    for name in [*STEP_COLUMNS, "final_state"]:
        if len({getattr(ep, name) is None for ep in episodes}) > 1:
            raise ValueError(f"episode field {name!r} is set in some episodes but not in others")
    return [name for name in STEP_COLUMNS if getattr(episodes[0], name) is not None]


def _frame_columns(episodes, fps: int, image_mode: str, img_key: dict, step_fields: list[str], tasks: list[str]
                   ) -> tuple[dict[str, list], list[dict]]:
    """The data file's columns (one entry per frame) and the episodes file's rows."""
    task_index = {t: i for i, t in enumerate(tasks)}
    columns: dict[str, list] = {k: [] for k in ["observation.state", "action", *img_key.values(),
                                                 "timestamp", "frame_index", "episode_index",
                                                 "index", "task_index"]}
    if image_mode == "video":
        for key in img_key.values():
            del columns[key]
    for name in step_fields:
        columns[STEP_COLUMNS[name][0]] = []
    ep_rows = []
    start = 0
    for e, ep in enumerate(episodes):
        length = len(ep.actions)
        columns["observation.state"] += list(ep.state)
        columns["action"] += list(ep.actions)
        if image_mode == "image":
            for cam, key in img_key.items():
                columns[key] += [{"bytes": _png_bytes(f), "path": None} for f in ep.images[cam]]
        columns["timestamp"] += (np.arange(length) / fps).astype(np.float32).tolist()
        columns["frame_index"] += list(range(length))
        columns["episode_index"] += [e] * length
        columns["index"] += list(range(start, start + length))
        columns["task_index"] += [task_index[ep.prompt]] * length
        for name in step_fields:
            columns[STEP_COLUMNS[name][0]] += getattr(ep, name).tolist()
        row = {"episode_index": e, "tasks": [ep.prompt], "length": length,
               "dataset_from_index": start, "dataset_to_index": start + length,
               "data/chunk_index": 0, "data/file_index": 0,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
               "seed": -1 if ep.seed is None else int(ep.seed), "success": bool(ep.success)}
        if ep.final_state is not None:
            row["final_state"] = ep.final_state.tolist()
        if image_mode == "video":
            for key in img_key.values():
                row[f"videos/{key}/chunk_index"] = 0
                row[f"videos/{key}/file_index"] = 0
                row[f"videos/{key}/from_timestamp"] = start / fps
                row[f"videos/{key}/to_timestamp"] = (start + length) / fps
        ep_rows.append(row)
        start += length
    return columns, ep_rows


def _write_data(root: str, episodes, columns: dict[str, list], img_key: dict, step_fields: list[str], fps: int,
                image_mode: str) -> dict:
    """data/chunk-000/file-000.parquet (and the videos in video mode); returns the written arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    state_dim, action_dim = episodes[0].state.shape[1], episodes[0].actions.shape[1]
    os.makedirs(os.path.join(root, "data", "chunk-000"), exist_ok=True)
    arrays = {
        "observation.state": pa.array([s.tolist() for s in columns["observation.state"]],
                                      type=pa.list_(pa.float32(), state_dim)),
        "action": pa.array([a.tolist() for a in columns["action"]], type=pa.list_(pa.float32(), action_dim)),
    }
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for key in img_key.values():
        if key in columns:
            arrays[key] = pa.array(columns[key], type=image_type)
    arrays["timestamp"] = pa.array(columns["timestamp"], type=pa.float32())
    for key in ("frame_index", "episode_index", "index", "task_index"):
        arrays[key] = pa.array(columns[key], type=pa.int64())
    for name in step_fields:
        key, dtype = STEP_COLUMNS[name]
        arrays[key] = pa.array(columns[key], type=pa.float32() if dtype is np.float32 else pa.bool_())
    if "terminated" in step_fields and "truncated" in step_fields:  # LeRobot's done = either end
        arrays["next.done"] = pa.array(np.logical_or(columns["next.terminated"], columns["next.truncated"]).tolist(),
                                       type=pa.bool_())
    pq.write_table(pa.table(arrays), os.path.join(root, "data", "chunk-000", "file-000.parquet"))
    if image_mode == "video":
        from .video import write_mp4

        for cam, key in img_key.items():
            frames = [f for ep in episodes for f in ep.images[cam]]
            write_mp4(os.path.join(root, "videos", key, "chunk-000", "file-000.mp4"), frames, fps)
    return arrays


def _write_episodes_meta(root: str, episodes, ep_rows: list[dict], tasks: list[str]) -> None:
    """meta/episodes (with LeRobot v3's per-episode "stats/<feature>/<stat>" columns), meta/tasks, meta/stats."""
    import pandas as pd

    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"), exist_ok=True)
    for row, ep in zip(ep_rows, episodes):
        for feature, values in (("observation.state", ep.state), ("action", ep.actions)):
            for stat, value in compute_stats(values).items():
                row[f"stats/{feature}/{stat}"] = value
    pd.DataFrame(ep_rows).to_parquet(os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"),
                                     index=False)
    pd.DataFrame({"task_index": list(range(len(tasks)))}, index=pd.Index(tasks, name="task")).to_parquet(
        os.path.join(root, "meta", "tasks.parquet"))
    all_state = np.concatenate([ep.state for ep in episodes])
    all_action = np.concatenate([ep.actions for ep in episodes])
    stats = {"observation.state": compute_stats(all_state), "action": compute_stats(all_action)}
    with open(os.path.join(root, "meta", "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)


def _features(episodes, arrays: dict, img_key: dict, step_fields: list[str], fps: int, image_mode: str,
              state_names, action_names) -> dict[str, Any]:
    """info.json's feature table."""
    state_dim, action_dim = episodes[0].state.shape[1], episodes[0].actions.shape[1]
    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": [state_dim],
                              "names": list(state_names) if state_names else None},
        "action": {"dtype": "float32", "shape": [action_dim],
                   "names": list(action_names) if action_names else None},
    }
    for cam, key in img_key.items():
        h, w = episodes[0].images[cam].shape[1:3]
        feat = {"dtype": image_mode, "shape": [h, w, 3], "names": ["height", "width", "channels"]}
        if image_mode == "video":
            feat["info"] = {"video.height": h, "video.width": w, "video.codec": "h264",
                            "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                            "video.channels": 3, "has_audio": False}
        features[key] = feat
    for key, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                       ("index", "int64"), ("task_index", "int64")):
        features[key] = {"dtype": dtype, "shape": [1], "names": None}
    for key in [STEP_COLUMNS[name][0] for name in step_fields] + (["next.done"] if "next.done" in arrays else []):
        features[key] = {"dtype": "float32" if key == "next.reward" else "bool", "shape": [1], "names": None}
    return features


# ---------------------------------------------------------------------------------------------
# Reader (v2.x and v3.0)
# ---------------------------------------------------------------------------------------------
_STATE_KEYS = ("observation.state", "state")
_ACTION_KEYS = ("action", "actions")


class LeRobotReader:
    """Reads a LeRobot v2.x / v3.0 dataset directory into memory (numeric columns) with lazy image
    decoding. Attributes: info, fps, state [N, S], actions [N, D], episode_index [N],
    frame_index [N], task_index [N], tasks {task_index: prompt}, episodes (list of dicts with
    episode_index, from, to, length), camera_keys {camera name: feature key}.
    """

    def __init__(self, root: str, state_key: str | None = None, action_key: str | None = None,
                 camera_keys: dict[str, str] | None = None):
        import pandas as pd

        self.root = root
        info_path = os.path.join(root, "meta", "info.json")
        if not os.path.exists(info_path):
            raise FileNotFoundError(f"{root}: no meta/info.json (not a LeRobot dataset)")
        with open(info_path) as f:
            self.info = json.load(f)
        self.version = str(self.info.get("codebase_version", "v2.0"))
        if not self.version.startswith(("v2", "v3")):
            raise ValueError(f"{root}: LeRobot {self.version} not supported (v2.x, v3.0)")
        self.fps = int(self.info["fps"])
        features = self.info["features"]
        self.state_key = state_key or next((k for k in _STATE_KEYS if k in features), None)
        self.action_key = action_key or next((k for k in _ACTION_KEYS if k in features), None)
        if self.state_key is None or self.action_key is None:
            raise KeyError(f"{root}: cannot tell the state/action features among {sorted(features)};"
                           " pass state_key= and action_key=")
        if camera_keys is None:
            camera_keys = {}
            for key, feat in features.items():
                if feat.get("dtype") in ("image", "video"):
                    name = key.split(".")[-1] if key.startswith("observation.images.") else key
                    camera_keys[name] = key
        self.camera_keys = dict(camera_keys)
        self.video_keys = {k for k, f in features.items() if f.get("dtype") == "video"}

        files = sorted(glob.glob(os.path.join(root, "data", "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"{root}: no data/**/*.parquet")
        frame = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
        frame = frame.sort_values(["episode_index", "frame_index"], kind="stable").reset_index(drop=True)
        self._frame = frame
        self.state = np.stack(frame[self.state_key].to_numpy()).astype(np.float32).reshape(len(frame), -1)
        self.actions = np.stack(frame[self.action_key].to_numpy()).astype(np.float32).reshape(len(frame), -1)
        self.episode_index = frame["episode_index"].to_numpy().astype(np.int64)
        self.frame_index = frame["frame_index"].to_numpy().astype(np.int64)
        self.task_index = (frame["task_index"].to_numpy().astype(np.int64) if "task_index" in frame
                           else np.zeros(len(frame), dtype=np.int64))
        self.tasks = self._read_tasks()
        self.episode_meta = self._read_episode_meta()
        self.episodes = []
        bounds = np.flatnonzero(np.diff(self.episode_index)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(frame)]])
        for s, e in zip(starts, ends):
            self.episodes.append({"episode_index": int(self.episode_index[s]), "from": int(s), "to": int(e),
                                  "length": int(e - s)})
        self._video_cache: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.actions)

    def _read_tasks(self) -> dict[int, str]:
        import pandas as pd

        meta = os.path.join(self.root, "meta")
        if os.path.exists(os.path.join(meta, "tasks.parquet")):
            df = pd.read_parquet(os.path.join(meta, "tasks.parquet"))
            if "task" in df.columns:
                return {int(i): str(t) for t, i in zip(df["task"], df["task_index"])}
            return {int(i): str(t) for t, i in zip(df.index, df["task_index"])}
        if os.path.exists(os.path.join(meta, "tasks.jsonl")):
            with open(os.path.join(meta, "tasks.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return {int(r["task_index"]): str(r["task"]) for r in rows}
        return {}

    def _read_episode_meta(self) -> dict[int, dict]:
        import pandas as pd

        meta = os.path.join(self.root, "meta")
        files = sorted(glob.glob(os.path.join(meta, "episodes", "**", "*.parquet"), recursive=True))
        if files:
            df = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
            return {int(r["episode_index"]): r for r in df.to_dict("records")}
        if os.path.exists(os.path.join(meta, "episodes.jsonl")):
            with open(os.path.join(meta, "episodes.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return {int(r["episode_index"]): r for r in rows}
        return {}

    def column(self, key: str, dtype=None) -> np.ndarray | None:
        """A per-frame data column [N] (e.g. "next.reward", "chunk_start"), or None if the dataset
        has none (demos carry no rewards)."""
        if key not in self._frame.columns:
            return None
        values = self._frame[key].to_numpy()
        return values.astype(dtype) if dtype is not None else values

    def episode_final_state(self, episode: int) -> np.ndarray | None:
        """The observation after an episode's last action (RL data), or None."""
        value = self.episode_meta.get(int(episode), {}).get("final_state")
        return None if value is None else np.asarray(value, dtype=np.float32)

    def prompt(self, row: int) -> str:
        if "task" in self._frame.columns:  # some converters store the prompt on every frame
            return str(self._frame["task"].iat[row])
        return self.tasks.get(int(self.task_index[row]), "")

    def _video_frames(self, key: str, episode: int) -> tuple[np.ndarray, int]:
        """(frames of the file holding `episode`, index of the episode's first frame in it)."""
        from .video import read_mp4

        meta = self.episode_meta.get(episode, {})
        if self.version.startswith("v3"):
            chunk = int(meta.get(f"videos/{key}/chunk_index", 0))
            file_index = int(meta.get(f"videos/{key}/file_index", 0))
            path = self.info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file_index)
            offset = int(round(float(meta.get(f"videos/{key}/from_timestamp", 0.0)) * self.fps))
        else:
            chunk = episode // int(self.info.get("chunks_size", 1000))
            path = self.info["video_path"].format(video_key=key, episode_chunk=chunk, episode_index=episode)
            offset = 0
        cache_key = (key, path)
        if cache_key not in self._video_cache:
            self._video_cache[cache_key] = read_mp4(os.path.join(self.root, path))
        return self._video_cache[cache_key], offset

    def image(self, camera: str, row: int) -> np.ndarray:
        key = self.camera_keys[camera]
        if key in self.video_keys:
            frames, offset = self._video_frames(key, int(self.episode_index[row]))
            return frames[offset + int(self.frame_index[row])]
        return _decode_image(self._frame[key].iat[row])

class ConcatReader:
    """Several LeRobot datasets read as one (the LeRobotReader attributes SFT uses).

    Rows, episodes and frames are those of the datasets one after the other; episode indices are
    renumbered to stay unique, and tasks are merged by their prompt text, so the same prompt in two
    datasets is one task. All datasets need the same state and action sizes and the same cameras.
    """

    def __init__(self, roots: Sequence[str], **reader_kwargs):
        if not roots:
            raise ValueError("ConcatReader: no dataset roots")
        self.parts = [LeRobotReader(root, **reader_kwargs) for root in roots]
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.state.shape[1], part.actions.shape[1]) != (first.state.shape[1], first.actions.shape[1]):
                raise ValueError(f"{part.root}: state/action sizes {part.state.shape[1]}/{part.actions.shape[1]}"
                                 f" differ from {first.root}'s {first.state.shape[1]}/{first.actions.shape[1]}")
            if part.fps != first.fps:
                raise ValueError(f"{part.root}: fps {part.fps} differs from {first.root}'s {first.fps}")
            if sorted(part.camera_keys) != sorted(first.camera_keys):
                raise ValueError(f"{part.root}: cameras {sorted(part.camera_keys)} differ from"
                                 f" {first.root}'s {sorted(first.camera_keys)}")
        self.root = ",".join(roots)
        self.fps = first.fps
        self.camera_keys = dict(first.camera_keys)
        self.state = np.concatenate([p.state for p in self.parts])
        self.actions = np.concatenate([p.actions for p in self.parts])
        self.frame_index = np.concatenate([p.frame_index for p in self.parts])
        texts = [[part.prompt(row) for row in range(len(part))] for part in self.parts]
        self.tasks = dict(enumerate(sorted({t for part_texts in texts for t in part_texts})))
        by_text = {text: i for i, text in self.tasks.items()}
        episode_index, task_index, self.episodes, starts = [], [], [], []
        row0 = episode0 = 0
        for part, part_texts in zip(self.parts, texts):
            if not len(part):
                raise ValueError(f"{part.root}: no frames")
            shift = episode0 - int(part.episode_index.min())  # renumber: episodes stay unique
            starts.append(row0)
            episode_index.append(part.episode_index + shift)
            task_index.append(np.array([by_text[t] for t in part_texts], dtype=np.int64))
            self.episodes += [{"episode_index": ep["episode_index"] + shift, "from": ep["from"] + row0,
                               "to": ep["to"] + row0, "length": ep["length"]} for ep in part.episodes]
            row0 += len(part)
            episode0 = int(episode_index[-1].max()) + 1
        self._part_start = np.asarray(starts)
        self.episode_index = np.concatenate(episode_index)
        self.task_index = np.concatenate(task_index)

    def __len__(self) -> int:
        return len(self.actions)

    def _locate(self, row: int) -> tuple[LeRobotReader, int]:
        part = int(np.searchsorted(self._part_start, row, side="right")) - 1
        return self.parts[part], row - int(self._part_start[part])

    def prompt(self, row: int) -> str:
        return self.tasks[int(self.task_index[row])]

    def image(self, camera: str, row: int) -> np.ndarray:
        part, local = self._locate(row)
        return part.image(camera, local)

# ---------------------------------------------------------------------------------------------
# SFT batches
# ---------------------------------------------------------------------------------------------
class SFTChunkDataset:
    """Action chunks for flow-matching SFT from a LeRobot dataset (or several: `root` a list).

    Sample i is frame i: its observation (images, state, prompt) and the actions of frames
    i .. i+H-1 of the same episode. Steps past the episode end repeat the last action and are
    marked invalid in `action_valid` [H]; action dims are zero-padded to `action_pad_dim` with
    `mask_dims` [D_pad] marking the real ones. State and actions stay in raw units: normalisation
    belongs to the policy's processor (`vla.normalize`), whose stats SFT computes from `reader`.
    """

    def __init__(self, root: str | Sequence[str], horizon: int, *, action_pad_dim: int | None = None,
                 cameras: Sequence[str] | None = None,
                 image_size: tuple[int, int] | None = None, **reader_kwargs):
        if horizon < 1:
            raise ValueError("horizon must be >= 1")
        if isinstance(root, str):
            self.reader = LeRobotReader(root, **reader_kwargs)
        else:
            self.reader = ConcatReader(list(root), **reader_kwargs)
        self.horizon = horizon
        self.action_dim = self.reader.actions.shape[1]
        self.action_pad_dim = action_pad_dim or self.action_dim
        if self.action_pad_dim < self.action_dim:
            raise ValueError(f"action_pad_dim {self.action_pad_dim} < dataset action dim {self.action_dim}")
        self.cameras = list(cameras) if cameras is not None else list(self.reader.camera_keys)
        unknown = [c for c in self.cameras if c not in self.reader.camera_keys]
        if unknown:
            raise KeyError(f"cameras {unknown} not in the dataset ({sorted(self.reader.camera_keys)})")
        self.image_size = image_size
        # Row r's episode end (exclusive), to build chunks without crossing episodes.
        self._episode_end = np.empty(len(self.reader), dtype=np.int64)
        for ep in self.reader.episodes:
            self._episode_end[ep["from"]:ep["to"]] = ep["to"]

    def __len__(self) -> int:
        return len(self.reader)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if self.image_size is None or image.shape[:2] == tuple(self.image_size):
            return image
        from PIL import Image

        height, width = self.image_size
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))

    def get_batch(self, rows: Iterable[int]) -> dict[str, Any]:
        rows = np.asarray(list(rows), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)})")
        steps = rows[:, None] + np.arange(self.horizon)[None, :]
        valid = steps < self._episode_end[rows][:, None]
        steps = np.minimum(steps, self._episode_end[rows][:, None] - 1)
        actions = self.reader.actions[steps]  # [B, H, D]
        state = self.reader.state[rows]
        padded = np.zeros((len(rows), self.horizon, self.action_pad_dim), dtype=np.float32)
        padded[..., : self.action_dim] = actions
        mask_dims = np.zeros(self.action_pad_dim, dtype=bool)
        mask_dims[: self.action_dim] = True
        images = {cam: np.stack([self._resize(self.reader.image(cam, int(r))) for r in rows])
                  if len(rows) else np.zeros((0, 1, 1, 3), np.uint8) for cam in self.cameras}
        return {
            "images": images,
            "state": state.astype(np.float32),
            "prompt": [self.reader.prompt(int(r)) for r in rows],
            "actions": padded,
            "action_valid": valid,
            "mask_dims": mask_dims,
            "episode_index": self.reader.episode_index[rows],
            "frame_index": self.reader.frame_index[rows],
        }

    def sample_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.get_batch(rng.integers(0, len(self), size=batch_size))

    def iter_epoch(self, batch_size: int, rng: np.random.Generator | None = None):
        order = np.arange(len(self)) if rng is None else rng.permutation(len(self))
        for start in range(0, len(order), batch_size):
            yield self.get_batch(order[start:start + batch_size])
