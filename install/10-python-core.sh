# Core Python stack: torch (local CPU wheel), transformers, the project itself (editable).
# Sourced by ../install.sh; $PIP and $CONSTRAINTS are set there.
$PIP install torch==2.13.0
$PIP install \
  "numpy<2" "transformers==5.23.0" safetensors tokenizers sentencepiece \
  hydra-core omegaconf scipy tqdm pytest pytest-timeout
$PIP install --no-deps -e "$ROOT"
