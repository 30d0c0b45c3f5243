"""Meshes, logical-axis rules, expert parallelism, multi-host start-up (sharding issue)."""
