"""Benchmarks of the training side: scripts that print figures (never timed tests)."""
