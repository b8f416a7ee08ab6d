"""Adapters that put hybridlab's estimator inside other training libraries.

Each adapter is a separate module with its own optional dependency; importing this package imports none of them:

    hybridlab.integrations.trl    HybridGRPOConfig / HybridGRPOTrainer for TRL (pip install "hybridlab[trl]")
"""
