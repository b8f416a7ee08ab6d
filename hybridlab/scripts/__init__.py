"""User commands: `python -m hybridlab.scripts.make_tiny_models`, `python -m hybridlab.scripts.fetch_real_model` (`make real-model`), `python -m hybridlab.scripts.check_distributed`."""
