"""`python -m hybridlab.bench ...`: see `hybridlab.bench` for the subcommands."""

from . import main

main()
