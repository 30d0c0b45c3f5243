"""GRPO, rewards, rollouts and the R1-Zero / R1 pipelines (in progress: rewards first)."""
