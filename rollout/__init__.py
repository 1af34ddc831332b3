"""rollout: Ray workers, DeepSpeed learners, weight sync. Places and moves things; no math."""
