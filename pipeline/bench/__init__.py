"""Benchmarks: scripts, never timed tests. Each runs its baseline in the same process, on the same
data, and reports medians and ratios (machines here are noisy). Results go in docs/benchmarks.md."""
