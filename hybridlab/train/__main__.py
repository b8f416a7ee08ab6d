"""`python -m hybridlab.train`: see hybridlab/train/__init__.py and configs/README.md."""

import os
import sys

from . import cli

status = cli()  # bad config, paths, vocabularies, a full disk: a message, not a traceback
if status:
    sys.exit(status)
if "torch" in sys.modules:
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        # Multi-process CPU runs: skip the gloo teardown at interpreter exit, which can deadlock (its destructor
        # joins a worker thread while holding the GIL that thread waits for). Everything is written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
