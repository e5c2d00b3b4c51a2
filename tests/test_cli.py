"""The command line, run in-process (``tests.helpers.cli``); `run` in a real process."""
import json
import subprocess
import sys

from tests.helpers import MAIN, SHARED, Result, cli, make_read_only, open_folder, picture, unprivileged


def test_score_prints_faces_and_scores_as_json(tmp_path):
    (tmp_path / "a.png").write_bytes(picture(1, fmt="PNG"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    real = sorted(SHARED.glob("illustrations/grapeot_*.jpg"))[:1]
    out = cli(tmp_path, "score", "--json", "a.png", "broken.jpg", *map(str, real))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results[0]["path"] == "a.png" and results[0]["whole_image"] and 1 <= results[0]["score"] <= 5
    assert "corrupt or truncated" in results[1]["error"]
    if real:
        assert results[2]["faces"] and results[2]["faces"][0]["detector"] == "animeface"
        assert results[2]["score"] == max(f["score"] for f in results[2]["faces"])
    assert (tmp_path / "data" / "tastefeed.db").exists()


def test_score_text_output(tmp_path):
    (tmp_path / "a.jpg").write_bytes(picture(2))
    out = cli(tmp_path, "score", "a.jpg")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("a.jpg: no face, not trained yet (whole picture)")  # untrained: no score


def test_bad_config_key_stops_with_one_line(tmp_path):
    (tmp_path / "config.toml").write_text('[scorer]\narch = "vgg"\n')
    out = cli(tmp_path, "doctor")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "config.toml: scorer.arch: expected one of" in out.stderr


def test_sources_add_list_test_remove(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "one.jpg").write_bytes(picture(1))
    out = cli(tmp_path, "sources", "add", "mine", "folder", f"path={folder}", "interval=30", "settle=0")
    assert out.returncode == 0, out.stderr
    listed = cli(tmp_path, "sources", "list").stdout
    assert "mine  [folder, cli]  ok  every 30.0s" in listed and "inbox  [folder, config]" in listed
    tested = cli(tmp_path, "sources", "test", "mine")
    assert "1 item(s)" in tested.stdout and "one.jpg" in tested.stdout
    bad = cli(tmp_path, "sources", "add", "x", "booru", "ratings=[\"nsfw\"]")
    assert bad.returncode == 1 and "ratings" in bad.stderr
    refused = cli(tmp_path, "sources", "remove", "inbox")
    assert refused.returncode == 1 and "defined in" in refused.stderr
    assert cli(tmp_path, "sources", "remove", "mine").returncode == 0
    assert "mine" not in cli(tmp_path, "sources", "list").stdout


def test_doctor_reports_each_part(tmp_path):
    out = cli(tmp_path, "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    for part in ("config", "database", "media folder", "detector", "device", "model"):
        assert any(line.startswith(part) and " OK " in line for line in out.stdout.splitlines()), part
    (tmp_path / "config.toml").write_text('[detector]\nname = "yolo"\nweights = "nope.pt"\n')
    out = cli(tmp_path, "doctor")
    assert out.returncode == 1 and "detector" in out.stdout and "nope.pt" in out.stdout


def test_errors_of_each_layer_are_one_line_and_exit_code_1(tmp_path):
    for args, message in [(["models", "use", "nope"], "error: no model 'nope' (known: "),      # ModelError
                          (["train"], "error: only 0 labelled picture(s) with faces"),         # TrainError
                          (["sources", "test", "nope"], "error: no source named 'nope'")]:
        out = cli(tmp_path, *args)
        assert (out.returncode, out.stdout) == (1, ""), out.stderr
        assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [out.stderr.splitlines()[-1]]
        assert out.stderr.splitlines()[-1].startswith(message), out.stderr
    assert cli(tmp_path, "models", "nope").returncode == 2  # argparse


def test_a_read_only_database_is_one_clear_line():
    with open_folder() as folder:
        assert cli(folder, "sources", "list").returncode == 0  # creates data/tastefeed.db
        make_read_only(folder / "data")
        out = Result(**json.loads(unprivileged(lambda: json.dumps(vars(cli(folder, "sources", "list"))))))
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.startswith("error: data/tastefeed.db: attempt to write a readonly database "
                                 "(is the file read-only, locked by another program, or its folder missing?)")
    assert out.stderr.count("\n") == 1


def test_run_starts_creates_data_and_stops_on_sigint(tmp_path):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(MAIN), "run"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "data" / "tastefeed.db").exists():
            time.sleep(0.5)
        time.sleep(3)
        assert (tmp_path / "inbox").is_dir()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "drop pictures into" in out and "stopped" in out
