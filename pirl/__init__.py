"""pirl: online RL fine-tuning and test-time Q guidance for flow-matching VLA policies."""
__version__ = "0.1.0"
