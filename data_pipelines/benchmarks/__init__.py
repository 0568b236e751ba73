"""Benchmarks of the data side: scripts that print figures (never timed tests)."""
