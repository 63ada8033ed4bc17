"""The training step and what surrounds it: DeepSpeed setup, schedule, checkpoints, logging, evaluation."""
