"""Full retraining from the daemon: `main.py train --full` in a child process, one run at a time.

A separate process keeps polling, posting and reactions responsive (training holds the CPU and
the GIL for minutes) and makes a crash in training harmless: the child writes nothing until its
model is finished (see ``scorer.train``), and ``train.lock`` keeps a second run, from here or
from the command line, from starting meanwhile. The child's log lines are passed on, prefixed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("tastefeed.retrain")

# The child runs the command line as ``python -P -m bot.cli train`` (an installed tastefeed has no
# main.py) with the folder holding the bot package (a checkout, or site-packages) first on its path,
# so it runs this same code; -P keeps the working directory off the path.
ROOT = Path(__file__).resolve().parents[1]


class Retrainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.proc: asyncio.subprocess.Process | None = None
        self.runs = 0
        self.last_exit: int | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def command(self) -> list[str]:
        cmd = [sys.executable, "-P", "-m", "bot.cli"]
        if self.cfg.path:
            cmd += ["--config", str(Path(self.cfg.path).resolve())]
        return cmd + ["train", "--full"]

    def start(self, reason: str, on_done=None) -> bool:
        """Start a run unless one is going; ``on_done(exit_code)`` is awaited after it ends."""
        if self.running:
            log.info("retraining (%s) not started: a run is still going", reason)
            return False
        log.info("retraining: %s", reason)
        self.runs += 1
        self._task = asyncio.create_task(self._run(on_done), name="retrain")
        return True

    async def _run(self, on_done) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as e:
            log.error("retraining could not start: %s", e)
            self.last_exit = -1
            return
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line and "\r" not in line:  # progress bars are for terminals
                log.info("train: %s", line)
        code = await self.proc.wait()
        self.last_exit = code
        if code == 0:
            log.info("retraining finished")
        else:
            log.warning("retraining ended with exit code %s; the active model is unchanged", code)
        self.proc = None
        if on_done is not None:
            await on_done(code)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop a run in progress (it leaves nothing half-written) and wait for it."""
        if self.proc is not None and self.proc.returncode is None:
            log.info("stopping the training run in progress")
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                if self.proc is not None:
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self._task.cancel()
            except Exception:  # noqa: BLE001
                pass
