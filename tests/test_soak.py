"""The soak harness (bench/soak.py) for two minutes: a hostile local server, the real daemon killed
with SIGKILL and restarted, ratings posted to the gallery throughout. Nothing may be lost,
duplicated or left unscored, no acknowledged rating may be lost, and no fault may leave a traceback
or a forged log line."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("soak", module)   # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_two_minutes_of_faults_and_kills_lose_nothing(tmp_path):
    soak = load_soak()
    report = await soak.soak(2.0, 3, seed=7, work=tmp_path, drain_s=150, progress=lambda m: None)
    summary = json.dumps(report, indent=1)
    items, ratings = report["items"], report["ratings"]
    assert report["daemon"]["kills"] == 3 and report["daemon"]["starts"] >= 4, summary
    assert items["served"] >= 150 and sum(report["faults_served"]["feeds"].values()) > 0, summary
    assert items["lost"] == 0 and items["duplicated"] == 0, summary
    assert items["good"] > 100 and items["never_scored"] == 0, summary
    assert items["bad_pictures"] > 0 and items["bad_scored"] == 0, summary
    assert ratings["acknowledged"] > 20 and ratings["lost"] == 0, summary
    assert report["integrity_check"] == "ok", summary
    assert report["daemon"]["unexpected_exits"] == [], summary
    assert report["refused_address_connections"] == 0, summary
    assert report["log"]["tracebacks"] == 0 and report["log"]["forged_lines"] == 0, summary
    assert soak.ok(report)
