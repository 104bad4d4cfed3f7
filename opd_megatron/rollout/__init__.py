"""Rollouts: prompts, generation from the student (behind the `RolloutEngine` interface), the batch structure."""
