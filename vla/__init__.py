"""vla: the π0 / π0.5 flow-matching vision-language-action model. Knows nothing about RL."""
