"""mp4 recording of chosen envs, one file per episode (imageio + the ffmpeg binary of imageio-ffmpeg)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def write_mp4(path: str, frames: Sequence[np.ndarray], fps: int = 20) -> str:
    """Write uint8 [H, W, 3] frames to an H.264 mp4; sizes are padded to even numbers for yuv420p."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("write_mp4: no frames")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    height, width = frames[0].shape[:2]
    pad_h, pad_w = height % 2, width % 2
    # macro_block_size=1 keeps the size as given (after our even padding) instead of resizing.
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1,
                            ffmpeg_log_level="error", pixelformat="yuv420p") as writer:
        for frame in frames:
            frame = np.asarray(frame, dtype=np.uint8)
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            writer.append_data(frame)
    return path


def read_mp4(path: str) -> np.ndarray:
    """All frames of a video as uint8 [T, H, W, 3]."""
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="ffmpeg") as reader:
        return np.stack([np.asarray(f) for f in reader])


class VideoRecorder:
    """Collects the frames of one env; writes `env{index:03d}_ep{n:04d}[_success].mp4` per episode."""

    def __init__(self, directory: str, env_index: int, fps: int = 20):
        self.directory = directory
        self.env_index = env_index
        self.fps = fps
        self.frames: list[np.ndarray] = []
        self.episode = 0
        self.written: list[str] = []

    def add(self, frame: np.ndarray | None) -> None:
        if frame is not None:
            self.frames.append(np.array(frame, dtype=np.uint8, copy=True))

    def finish(self, success: bool) -> str | None:
        path = None
        if self.frames:
            name = f"env{self.env_index:03d}_ep{self.episode:04d}{'_success' if success else ''}.mp4"
            path = write_mp4(os.path.join(self.directory, name), self.frames, self.fps)
            self.written.append(path)
        self.frames = []
        self.episode += 1
        return path

    def discard(self) -> None:
        self.frames = []
