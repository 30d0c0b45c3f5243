"""GRPO and its rewards: rule-based rewards (format, accuracy, countdown, language
consistency, sandboxed code execution), the GRPO objective, rollouts and the trainer, and the
verifiable tasks the R1-Zero experiment learns from."""
