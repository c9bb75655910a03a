"""Training: recipes, the trainer, optimisers and schedules, checkpoints, training curves."""
