"""Value heads (PPO) and, later, the chunked Q critic for guidance (METHODS.md §4-5)."""
