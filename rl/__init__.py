"""RL: GRPO, rollouts, rule-based and sandboxed rewards, rejection sampling (RL issues)."""
