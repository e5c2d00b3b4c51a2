"""How many threads torch (and OpenMP under it) uses: ``scorer.threads``, applied deliberately.

torch's default is one OpenMP thread per core, and OpenMP threads spin while they wait for work.
On a small or shared machine they spin against each other and against everything else: on the
2-core development machine, shared with other jobs, a training epoch took about 4 times longer
with torch's default than with one thread, and one-at-a-time scoring 4-5 times more CPU
(``bench/threads.py``; bench/RESULTS.md, "Torch threads").

Two steps, because OpenMP reads its settings once, when torch is first imported:

- :func:`prepare` (no torch import, so any command may call it first thing): sets
  ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep instead of spinning) and ``OMP_NUM_THREADS``
  / ``MKL_NUM_THREADS`` in this process's environment, so that torch picks them up when it is
  imported and every child process (``train --full`` from the daemon, detection workers) inherits them;
- :func:`apply`: ``torch.set_num_threads`` and, once per process before any parallel work,
  ``torch.set_num_interop_threads``; idempotent, so the daemon, ``train`` and each worker process
  that runs torch simply call it at their start. A worker that never runs torch (face detection)
  calls :func:`prepare` only: ``apply`` imports torch, about 500 MiB.

``scorer.threads = 0`` (the default) chooses automatically: ``OMP_NUM_THREADS`` when the
environment already sets it, else 1 thread on a machine with up to 2 cores, else half the cores
(the other half is left to detection, downloads and the web gallery).
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("tastefeed.threads")

_applied: dict = {}  # what this process set: {"early": bool, "threads": n, "interop": m}


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve(threads: int = 0) -> int:
    """The number of torch threads for ``scorer.threads`` (0 = automatic, see the module docstring)."""
    if threads > 0:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    n = cores()
    return 1 if n <= 2 else n // 2


def prepare(threads: int = 0) -> int:
    """Set the OpenMP environment for this process and its children; returns the thread count.
    Call it before torch is imported (later it still reaches child processes). An
    ``OMP_WAIT_POLICY`` already in the environment is kept."""
    n = resolve(threads)
    _applied.setdefault("early", "torch" not in sys.modules)  # did OpenMP's settings reach torch?
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    return n


def apply(threads: int = 0) -> int:
    """:func:`prepare`, then set torch's intra-op threads (and, the first time in this process,
    its inter-op threads) to the resolved count; returns it. Safe to call again."""
    n = prepare(threads)
    if _applied.get("threads") == n:
        return n
    import torch

    torch.set_num_threads(n)
    if "interop" not in _applied:
        try:
            torch.set_num_interop_threads(n)
            _applied["interop"] = n
        except RuntimeError:  # parallel work already started in this process: torch keeps its count
            _applied["interop"] = torch.get_num_interop_threads()
    _applied["threads"] = n
    log.info("torch threads: %d intra-op, %d inter-op (scorer.threads = %s, %d cores, OMP_WAIT_POLICY=%s%s)",
             torch.get_num_threads(), _applied["interop"], threads or "0: automatic", cores(),
             os.environ.get("OMP_WAIT_POLICY"), "" if _applied["early"] else ", set after torch was imported")
    return n
