"""Value heads (PPO, `value`) and the chunked Q critic for test-time guidance (`q`: ChunkCritic,
bind, load_critic; `data`: transitions from LeRobot datasets; `train`: `pirl critic`), METHODS.md §4-5."""
