"""Pure loss and advantage functions: flow-matching SFT, GAE, PPO, GRPO (METHODS.md §4)."""
