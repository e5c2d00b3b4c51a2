"""scorer.threads: torch's thread count and OpenMP's wait policy, set in the daemon, ``train`` and
every child process (issue 17, point 2)."""
import logging
import os
import subprocess
import sys

import pytest

from bot.daemon import Daemon
from scorer import threads
from tests.helpers import MAIN, ROOT, make_config, write_config

OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


@pytest.fixture
def unset(monkeypatch):
    """No OpenMP variables in the environment and nothing applied yet in this process; both, and
    torch's thread count, are restored afterwards."""
    import torch

    for key in OMP_KEYS:
        monkeypatch.setenv(key, "")   # remembered first, so that the delenv below is undone too
        monkeypatch.delenv(key)
    monkeypatch.setattr(threads, "_applied", {})
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def clean_env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in OMP_KEYS}, **extra}


def test_automatic_is_one_thread_up_to_two_cores_else_half_unless_the_environment_says(unset, monkeypatch):
    for n, expected in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 8)):
        monkeypatch.setattr(threads, "cores", lambda n=n: n)
        assert threads.resolve(0) == expected
    assert threads.resolve(5) == 5                      # a number in the config is used as it is
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (threads.resolve(0), threads.resolve(2)) == (3, 2)


def test_apply_sets_torch_and_the_environment_once_and_can_be_called_again():
    code = """
import os, torch
from scorer import threads
assert threads.apply(3) == threads.apply(3) == 3
torch.ones(64, 64) @ torch.ones(64, 64)           # parallel work: the inter-op count is fixed now
assert threads.apply(2) == 2                      # a new count still reaches the intra-op threads
print(torch.get_num_threads(), torch.get_num_interop_threads(), os.environ["OMP_WAIT_POLICY"],
      os.environ["OMP_NUM_THREADS"])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "3", "PASSIVE", "2"]


def test_a_wait_policy_already_in_the_environment_is_kept(unset, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.prepare(1) == 1
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["OMP_NUM_THREADS"]) == ("ACTIVE", "1")


def test_train_runs_with_the_configured_threads(tmp_path):
    write_config(tmp_path, f'data_dir = "{tmp_path / "data"}"\n[scorer]\nthreads = 3\n')
    out = run_main(tmp_path, "train",
                   report="import torch; print('threads', torch.get_num_threads(), torch.get_num_interop_threads())")
    (line,) = [line for line in out.stderr.splitlines() if "torch threads:" in line]
    assert "torch threads: 3 intra-op, 3 inter-op (scorer.threads = 3," in line
    assert line.endswith("OMP_WAIT_POLICY=PASSIVE)")      # set before torch was imported
    assert "threads 3 3" in out.stdout   # read back from torch when the command ended


async def test_the_daemon_applies_the_threads_and_its_training_child_inherits_them(tmp_path, unset, monkeypatch,
                                                                                    caplog):
    import torch

    from bot.retrain import Retrainer

    cfg = make_config(tmp_path)
    cfg.scorer.threads = 3
    daemon = Daemon(cfg)
    caplog.set_level(logging.INFO)
    await daemon.start()
    try:
        assert torch.get_num_threads() == 3
        assert "torch threads: 3 intra-op" in caplog.text
        # the daemon's `train --full` child sees the same settings (here it prints them)
        monkeypatch.setattr(Retrainer, "command", lambda self: [
            sys.executable, "-c", "import os; print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'])"])
        retrainer = Retrainer(cfg)
        assert retrainer.start("test")
        await retrainer._task
        assert retrainer.last_exit == 0
        assert "train: PASSIVE 3" in caplog.text
    finally:
        await daemon.stop()


def run_main(cwd, *args, report: str) -> subprocess.CompletedProcess:
    """``main.py ARGS`` in a fresh process without OpenMP variables; ``report`` (Python code) runs
    at its exit and prints what the test checks."""
    code = (f"import atexit, runpy, sys\ndef report():\n    {report}\natexit.register(report)\n"
            f"sys.argv = [{str(MAIN)!r}, *{[str(a) for a in args]!r}]\nrunpy.run_path({str(MAIN)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=clean_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)


def test_scoring_with_the_default_detector_never_imports_ultralytics(tmp_path):
    from tests.helpers import picture

    (tmp_path / "a.jpg").write_bytes(picture(1))
    out = run_main(tmp_path, "score", "a.jpg", report="print('loaded', sorted(m for m in sys.modules if "
                   "m.split('.')[0] in ('ultralytics', 'torch')) [:1])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "loaded ['torch']"   # torch was used, ultralytics (~100 MiB) not
