"""envs: one batched VLA env API over ManiSkill3 and LIBERO. Knows nothing about models."""
