"""`python -m hybridlab.train`: see hybridlab/train/__init__.py and configs/README.md."""

import os
import sys

from . import main

try:
    main()
except (ValueError, FileNotFoundError) as e:  # bad config, paths, vocabularies: a message, not a traceback
    print(f"hybridlab.train: error: {e}", file=sys.stderr)
    sys.exit(2)
if "torch" in sys.modules:
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        # Multi-process CPU runs: skip the gloo teardown at interpreter exit, which can deadlock (its destructor
        # joins a worker thread while holding the GIL that thread waits for). Everything is written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
