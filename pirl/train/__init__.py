"""Trainers: SFT (behaviour cloning), RL (PPO / GRPO), evaluation, checkpoints and logging."""
