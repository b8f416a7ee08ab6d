"""`python -m hybridlab.integrations.trl --demo`: the tiny CPU example (examples/trl_tiny.py)."""

from . import _demo

_demo()
