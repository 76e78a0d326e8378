"""Set-up shared by every test module."""

from __future__ import annotations

import os

# Under pytest-xdist (``make test`` runs ``-n auto``) each worker is its own process: the cores are
# split between them, or their torch thread pools oversubscribe the machine (on the 2-core CI, two
# workers of two threads each ran SmolLM2's recovery test 6x slower than one worker alone). The
# variable also reaches the CLI tests' subprocesses; a value the user set is left alone.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # the cores this process may use (Linux); elsewhere all of them
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
