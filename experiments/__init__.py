"""Experiments: programs that write data/results/ (run from the repository root: python -m experiments.NAME)."""
