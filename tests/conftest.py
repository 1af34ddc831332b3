"""Test-wide defaults: one thread, no network, offline logging (../shared/ENVIRONMENT.md)."""
import os

for _key, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402  (after the thread settings above)

torch.set_num_threads(1)
