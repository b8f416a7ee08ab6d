"""Command-line scripts: `python -m hybridlab.scripts.train_teacher`, `python -m hybridlab.scripts.compare`."""
