"""How far a training run is: ``<data>/train-progress.json``, written by the run, read by the gallery.

A full run (``train --full``, which the daemon starts in a child process) and a head refit both
write it: the stage, the epoch and the time left (the mean epoch time so far times the epochs to
go; early stopping may end sooner), then how the run ended. The Model page reads it, so a run
started from the command line shows there too. A run that was killed leaves ``state`` at
``running`` with a process that is gone: :func:`read_progress` reports it as ``stopped``.
The file is replaced whole on every write (a reader never sees half of it).
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

FILE = "train-progress.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TrainProgress:
    """The progress file of one run (``kind``: ``full`` or ``head``) in the data folder ``root``."""

    def __init__(self, root: str | Path, kind: str):
        self.path = Path(root) / FILE
        self.data = {"pid": os.getpid(), "kind": kind, "state": "running", "stage": "starting",
                     "epoch": None, "epochs": None, "seconds_left": None, "started_at": _now(),
                     "updated_at": _now(), "message": None}
        self._epoch_seconds: list[float] = []
        self._write()

    def stage(self, stage: str) -> None:
        self.data.update(stage=stage, seconds_left=None)
        self._write()

    def epoch(self, epoch: int, epochs: int, seconds: float) -> None:
        """Epoch ``epoch`` of ``epochs`` took ``seconds``."""
        self._epoch_seconds.append(seconds)
        mean = sum(self._epoch_seconds) / len(self._epoch_seconds)
        self.data.update(stage="training the network", epoch=epoch, epochs=epochs,
                         seconds_left=round(mean * (epochs - epoch)))
        self._write()

    def finish(self, ok: bool, message: str) -> None:
        self.data.update(state="done" if ok else "failed", message=message, seconds_left=None,
                         finished_at=_now())
        self._write()

    def _write(self) -> None:
        self.data["updated_at"] = _now()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        except OSError:
            pass  # progress is for show: a full disk must not stop the training run


def pid_alive(pid) -> bool:
    """Whether a process with this id runs (False for anything that is not a pid)."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def read_progress(root: str | Path) -> dict | None:
    """The last run's progress (None if no run wrote any); ``state`` is ``running``, ``done``,
    ``failed``, or ``stopped`` (killed part way). ``elapsed`` is seconds since it started."""
    try:
        data = json.loads((Path(root) / FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("state") == "running" and not pid_alive(data.get("pid")):
        data["state"] = "stopped"
    try:
        started = datetime.fromisoformat(data["started_at"]).timestamp()
        data["elapsed"] = max(0, round(time.time() - started))
    except (KeyError, TypeError, ValueError):
        data["elapsed"] = None
    return data
