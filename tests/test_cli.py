"""The command line, run in-process (``tests.helpers.cli``); `run` in a real process."""
import json
import subprocess
import sys

from tests.helpers import MAIN, SHARED, Result, cli, make_config, make_read_only, open_folder, picture, unprivileged


def test_score_prints_faces_and_scores_as_json(tmp_path):
    (tmp_path / "a.png").write_bytes(picture(1, fmt="PNG"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    real = sorted(SHARED.glob("illustrations/grapeot_*.jpg"))[:1]
    out = cli(tmp_path, "score", "--json", "a.png", "broken.jpg", *map(str, real))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results[0]["path"] == "a.png" and results[0]["whole_image"] and 1 <= results[0]["score"] <= 5
    assert results[0]["detector"] == "animeface"                  # the configured detector's name
    assert "corrupt or truncated" in results[1]["error"]
    if real:
        assert results[2]["faces"] and results[2]["faces"][0]["detector"] == "animeface"
        assert results[2]["score"] == max(f["score"] for f in results[2]["faces"])
    assert not (tmp_path / "data").exists()      # a look writes nothing: no data folder, no model file


def test_score_text_output(tmp_path):
    (tmp_path / "a.jpg").write_bytes(picture(2))
    out = cli(tmp_path, "score", "a.jpg")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("a.jpg: no face, not trained yet (whole picture)")  # untrained: no score
    assert "\nfaces found by the detector animeface (configured in [detector])\n" in out.stdout


def test_score_names_the_owners_own_detector_when_one_is_in_use(tmp_path, monkeypatch):
    """With an own version in use (`detector use`), score detects with it and says so."""
    from scorer import analyze, own_detector
    from tests.fake_detectors import Scripted

    cfg = make_config(tmp_path)
    (cfg.paths.detectors / "v7").mkdir(parents=True)
    (cfg.paths.detectors / "v7" / own_detector.WEIGHTS).write_bytes(b"weights")
    own_detector.set_active(cfg.paths, "v7")
    used = []

    def make(dcfg, root):
        used.append(dcfg.name)
        return Scripted("yolo", {(160, 120): [(10, 10, 60, 60, 0.9)]})

    monkeypatch.setattr(analyze, "make_detector", make)
    (tmp_path / "a.jpg").write_bytes(picture(2))
    out = cli(tmp_path, "score", "a.jpg")
    assert out.returncode == 0, out.stderr
    assert used == ["yolo"] and out.stdout.startswith("a.jpg: 1 face(s), not trained yet")
    assert "\nfaces found by the detector own:v7 (your own, `detector use`)\n" in out.stdout
    [entry] = json.loads(cli(tmp_path, "score", "--json", "a.jpg").stdout)
    assert entry["detector"] == "own:v7" and entry["faces"][0]["detector"] == "yolo"
    crops = cli(tmp_path, "score", "--crops", "a.jpg").stdout           # nothing detected: no detector named
    assert "detector" not in crops
    assert json.loads(cli(tmp_path, "score", "--crops", "--json", "a.jpg").stdout)[0]["detector"] is None


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
    assert refused.returncode == 1 and "built-in default" in refused.stderr
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
    from storage import Store

    with open_folder() as folder:
        Store.open(folder / "data" / "tastefeed.db").close()
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


# ---- messages (issue 16, item 6) ---------------------------------------------------------------
def test_score_of_a_missing_file_fails_at_once_and_creates_nothing(tmp_path):
    import time
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(MAIN), "score", "nothere.jpg"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    took = time.monotonic() - started
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "error: nothere.jpg: no such file or folder\n")
    assert took < 2, f"{took:.1f}s: the arguments are checked before torch and the model load"
    assert list(tmp_path.iterdir()) == []                      # no ./data, no model file


def test_read_only_commands_create_no_data_folder(tmp_path):
    make_config(tmp_path)
    data = tmp_path / "data"
    for args in (["status"], ["sources", "list"], ["models", "list"], ["characters", "list"],
                 ["characters", "models"], ["prune", "--dry-run"], ["doctor"]):
        out = cli(tmp_path, *args)
        assert out.returncode in (0, 1) and "Traceback" not in out.stderr, (args, out)
        assert not data.exists(), f"{args} created {data}"
    assert "inbox  [folder, config]" in cli(tmp_path, "sources", "list").stdout
    assert cli(tmp_path, "models", "list").stdout.startswith("no models yet")
    doctor = cli(tmp_path, "doctor").stdout
    assert any(line.startswith("database") and " OK " in line and "not there yet" in line
               for line in doctor.splitlines()), doctor
    assert "no model yet: the first run creates the untrained" in doctor
    evaluated = cli(tmp_path, "eval")
    assert evaluated.returncode == 1 and evaluated.stderr.startswith("error: no database at ")
    assert not data.exists()


def test_score_a_folder_and_face_crops(tmp_path):
    make_config(tmp_path)
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    (pics / "a.png").write_bytes(picture(1, fmt="PNG"))
    (pics / "sub" / "b.jpg").write_bytes(picture(2))
    (pics / ".hidden.jpg").write_bytes(picture(3))
    (pics / "notes.txt").write_text("not a picture")
    out = cli(tmp_path, "score", "--json", "pics")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["path"] for r in results] == ["pics/a.png", "pics/sub/b.jpg"]
    assert "untrained" in out.stderr and not (tmp_path / "data").exists()
    crops = cli(tmp_path, "score", "--crops", "--json", "pics")
    assert crops.returncode == 0, crops.stderr
    for r in json.loads(crops.stdout):          # the whole picture is the face: no detection
        assert [(f["detector"], f["box"]) for f in r["faces"]] == [("crop", [0, 0, 160, 120])]
    text = cli(tmp_path, "score", "--crops", "pics/a.png").stdout
    assert text.startswith("pics/a.png: face crop, not trained yet") and "whole picture" not in text
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cli(tmp_path, "score", "empty")
    assert nothing.returncode == 1 and nothing.stderr.startswith("error: empty: no pictures in this folder")


def test_config_is_accepted_after_the_command(tmp_path):
    (tmp_path / "other.toml").write_text(f'data_dir = "{tmp_path / "d"}"\n[[sources]]\nname = "elsewhere"\n'
                                         f'kind = "folder"\npath = "{tmp_path / "in"}"\n')
    for args in (["sources", "list", "--config", "other.toml"], ["--config", "other.toml", "sources", "list"]):
        out = cli(tmp_path, *args)
        assert out.returncode == 0 and "elsewhere  [folder, config]" in out.stdout, (args, out)
    out = cli(tmp_path, "status", "--config", "nope.toml")
    assert (out.returncode, out.stderr) == (2, "error: nope.toml: no such file\n")


def test_ctrl_c_during_train_leaves_the_active_model(tmp_path, monkeypatch):
    import scorer.train
    from storage import Store

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    make_config(tmp_path)
    monkeypatch.setattr(scorer.train, "train_from_store", interrupted)
    out = cli(tmp_path, "train")
    assert (out.returncode, out.stdout) == (130, "")
    assert out.stderr.splitlines()[-1] == "interrupted; the active model is unchanged"
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        assert store.active_model()["version"] == "resnet18-random-init"


def test_import_labels_counts_add_up_in_line_order_with_a_warning_for_a_picture_rated_twice(tmp_path):
    from storage import Store

    make_config(tmp_path)
    for name, seed_ in (("a.png", 1), ("c.png", 3)):
        (tmp_path / name).write_bytes(picture(seed_, fmt="PNG"))
    (tmp_path / "bad.jpg").write_bytes(b"not a picture")
    (tmp_path / "r.csv").write_text("path,rating\na.png,2.0\nb.png,seven\nmissing.png,3\nc.png,4\na.png,5\n"
                                    "bad.jpg,1\nd.png,4.5\n")
    out = cli(tmp_path, "import-labels", "r.csv", "--crops")
    assert out.returncode == 0, out.stderr
    messages = [line for line in out.stderr.splitlines() if line.startswith(("skipped: ", "warning: "))]
    assert [line.split(": ")[:2] for line in messages] == [
        ["skipped", "r.csv:3"], ["skipped", "r.csv:4"], ["warning", "r.csv:6"], ["skipped", "r.csv:7"],
        ["skipped", "r.csv:8"]], out.stderr
    assert ("warning: r.csv:6: the same picture as r.csv:2, rated 2 there and 5 here: the later rating, 5, is imported"
            in messages)
    assert "skipped: r.csv:8: rating '4.5' is not a whole number from 1 to 5" in messages
    assert out.stdout.splitlines()[0] == ("imported r.csv: 7 row(s): 2 label(s) added, 0 unchanged, 1 rated again "
                                          "in a later row, 4 bad row(s) skipped; 2 new picture(s), 0 already stored")
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        titles = {r["id"]: r["title"] for r in store.execute("SELECT id, title FROM images")}
        assert {titles[r["image_id"]]: r["value"] for r in store.training_rows()} == {"a.png": 5, "c.png": 4}
        assert store.execute("SELECT COUNT(*) AS n FROM labels")[0]["n"] == 2   # a.png's 2 was never in use
    again = cli(tmp_path, "import-labels", "r.csv", "--crops").stdout.splitlines()[0]
    assert again.endswith("7 row(s): 0 label(s) added, 2 unchanged, 1 rated again in a later row, "
                          "4 bad row(s) skipped; 0 new picture(s), 2 already stored")          # nothing changes
    # a folder that is not a rating: one "skipped", no doubled word
    (tmp_path / "rated" / "4").mkdir(parents=True)
    (tmp_path / "rated" / "misc").mkdir()
    (tmp_path / "rated" / "4" / "c.png").write_bytes(picture(3, fmt="PNG"))
    folder = cli(tmp_path, "import-labels", "rated", "--crops")
    assert folder.stderr == "skipped: misc/: not a rating (expected folders 1 to 5)\n"


def test_removing_the_default_inbox_says_which_key_drops_it(tmp_path):
    out = cli(tmp_path, "sources", "remove", "inbox")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and not (tmp_path / "data").exists()
    assert out.stderr.startswith("error: source 'inbox' is the built-in default, used while there is no config file: "
                                 "to drop it, put `sources = []` at the top of a config.toml")
    (tmp_path / "config.toml").write_text("[web]\nport = 0\n")
    out = cli(tmp_path, "sources", "remove", "inbox")
    config = tmp_path / "config.toml"
    assert f"used while {config} names no sources: to drop it, put `sources = []` at the top of {config} " in out.stderr
    (tmp_path / "config.toml").write_text("sources = []\n[web]\nport = 0\n")    # the advice works
    assert cli(tmp_path, "sources", "list").stdout == "no sources\n"
    (tmp_path / "config.toml").write_text('[[sources]]\nname = "inbox"\nkind = "folder"\npath = "in"\n')
    out = cli(tmp_path, "sources", "remove", "inbox")
    assert out.stderr == f"error: source 'inbox' is defined in {config}: remove its [[sources]] table there\n"


def test_known_harmless_third_party_lines_are_quiet():
    import io
    import logging
    from datetime import timedelta

    from bot.logs import setup_logging

    handlers = list(logging.root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("", "apscheduler", "discord", "PIL", "urllib3",
                                                                "matplotlib")}
    stream = io.StringIO()
    try:
        setup_logging("INFO", stream)
        logging.getLogger("discord.client").warning("PyNaCl is not installed, voice will NOT be supported")
        logging.getLogger("discord.client").warning("davey is not installed, voice will NOT be supported")
        logging.getLogger("discord.client").warning("something else")
        missed = logging.getLogger("apscheduler.executors.default")
        missed.warning('Run time of job "%s" was missed by %s', "poll (trigger: interval)", timedelta(seconds=2))
        missed.warning('Run time of job "%s" was missed by %s', "backup (trigger: cron)", timedelta(hours=3))
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in handlers:
                logging.root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("discord.client: something else")
    assert lines[1].endswith('Run time of job "backup (trigger: cron)" was missed by 3:00:00')
