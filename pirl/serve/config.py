"""`pirl serve` settings (configs/serve.yaml); unknown keys are errors, as everywhere in pirl."""

from __future__ import annotations

import dataclasses
from typing import Any

from pirl.config import check_device


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    checkpoint: str
    """A pirl checkpoint directory (weights, norm_stats.json, tokenizer.model): SFT, RL or imported."""
    host: str = "127.0.0.1"
    """Interface to bind. Localhost unless told otherwise: 0.0.0.0 exposes the policy to the network
    (set api_key then)."""
    port: int = 8000
    """0 picks a free port (printed, and written to port_file)."""
    port_file: str | None = None
    """Write "host port" here once listening (launchers and tests wait on it)."""
    inputs: str = "pirl"
    """Request layout preset: pirl | libero | maniskill (`pirl.serve.inputs`)."""
    camera_map: dict = dataclasses.field(default_factory=dict)
    """Model camera -> request key path; overrides the preset's cameras."""
    state_key: str | None = None
    prompt_key: str | None = None
    default_prompt: str | None = None
    """Prompt used when a request has none (else a missing prompt is an error)."""
    num_steps: int | None = None
    """Denoising steps K (None: the model config's)."""
    device: str = "cpu"
    precision: str | None = None
    """fp32 | bf16 (None: bf16 on CUDA, fp32 on CPU)."""
    cuda_graphs: bool = True
    """On a CUDA device: replay the prefix and expert passes from CUDA graphs (`FlowPolicy.use_cuda_graphs`),
    one per batch size up to max_batch, all captured at startup. Ignored on the CPU."""
    torch_threads: int | None = None
    """torch intra-op threads for the model (None: torch's default / OMP_NUM_THREADS)."""
    max_batch: int = 16
    """Dynamic batching: at most this many requests per forward pass (1 = one at a time)."""
    max_wait_ms: float = 2.0
    """How long the first request of a batch waits for company when fewer than max_batch are queued."""
    max_queue: int = 256
    """Requests waiting for a batch; beyond it a request is answered `busy` at once."""
    max_connections: int = 256
    max_message_mb: float = 16.0
    """Largest request frame; a bigger one closes that connection with 1009 (message too big)."""
    max_image_side: int = 1024
    api_key: str | None = None
    """Required `Authorization: Api-Key <key>` header (openpi-client's api_key); also read from the
    PIRL_SERVE_API_KEY environment variable. /healthz and /stats need none."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM / SIGINT: stop accepting, answer what is queued or running, then close (at most this long)."""
    guidance: Any = None
    """Test-time guidance settings (as `pirl eval`), passed unchanged to `pirl.serve.policy.build_sample_fn`."""
    critic: str | None = None
    """Critic checkpoint for guidance, passed to `build_sample_fn`."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_connections < 1:
            raise ValueError("serve: max_batch, max_queue and max_connections must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("serve: max_wait_ms must be >= 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"serve: port {self.port} out of range")
        check_device(self.device, "device")
