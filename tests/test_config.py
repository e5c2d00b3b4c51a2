import io
import logging

import pytest

from bot.config import ConfigError, load_config
from bot.logs import redact, register_secret, setup_logging
from tests.helpers import write_config


def test_defaults_without_file(tmp_path):
    cfg = load_config(cwd=tmp_path)
    assert cfg.path is None
    assert cfg.data_dir == "data" and cfg.db_path.name == "tastefeed.db"
    assert [(s.name, s.kind, s.options["path"]) for s in cfg.sources] == [("inbox", "folder", "inbox")]
    assert cfg.detector.name == "animeface" and cfg.scorer.arch == "resnet18"


def test_config_toml_in_working_directory_is_read(tmp_path):
    write_config(tmp_path, 'data_dir = "elsewhere"\n')
    cfg = load_config(cwd=tmp_path)
    assert cfg.data_dir == "elsewhere"
    assert cfg.sources[0].name == "inbox"  # no [[sources]] key: the default inbox stays


def test_example_config_is_valid_and_matches_defaults():
    example = load_config("config.example.toml")
    defaults = load_config(cwd="/nonexistent")
    for section in ("log", "download", "detector", "scorer", "daemon", "train", "ranking", "discord", "web"):
        assert getattr(example, section) == getattr(defaults, section), section
    assert example.sources[0].options == defaults.sources[0].options


@pytest.mark.parametrize("body, message", [
    ('colour = "red"\n', "colour: unknown key"),
    ('[detector]\nname = "mtcnn"\n', "detector.name: expected one of 'animeface', 'lbp', 'animeface+lbp', 'opencv', 'yolo', got 'mtcnn'"),
    ('[detector]\nname = "lbp"\n', "detector.cascade: the lbp detector needs the path of lbpcascade_animeface.xml "
     "(download it from https://github.com/nagadomi/lbpcascade_animeface)"),
    ('[detector]\nname = "animeface+lbp"\n', "detector.cascade: the animeface+lbp detector needs"),
    ('[detector]\nmerge_iou = 1\n', "detector.merge_iou: expected a number from 0 to below 1, got 1"),
    ('[detector]\ntime_cap = -1\n', "detector.time_cap: expected seconds (0 or more; 0 turns the cap off), got -1"),
    ('[download]\ntimeout = "fast"\n', "download.timeout: expected a number, got 'fast'"),
    ('[download]\nworkers = 0\n', "download.workers: expected a positive number"),
    ('[scorer]\ndevice = "tpu"\n', "scorer.device: expected auto"),
    ('[scorer]\nbackbone = " "\n', "scorer.backbone: expected a non-empty string"),
    ('[scorer]\nthreads = -1\n', "scorer.threads: expected 0 (automatic) or a positive number of threads, got -1"),
    ('[scorer]\nbackbone_size = 16\n', "scorer.backbone_size: expected 0 (the backbone's own) or at least 32"),
    ('[scorer]\nbackbone_preprocess = "sepia"\n', "scorer.backbone_preprocess: expected one of 'imagenet', 'clip', 'wd14'"),
    ('[discord]\nowner_ids = ["me"]\n', "discord.owner_ids[0]: expected an integer, got 'me'"),
    ('[discord.reactions]\n"⭐" = 7\n', "discord.reactions.⭐: expected a rating from 1 to 5, got 7"),
    ('[discord]\nposts_per_cycle = 0\n', "discord.posts_per_cycle: expected a positive number"),
    ('[detector]\nname = "yolo"\n', "detector.weights: the yolo detector needs"),
    ('[detector]\nworkers = -1\n', "detector.workers: expected 0 (half the cores) or a positive number, got -1"),
    ('[[sources]]\nname = "x"\nkind = "ftp"\n', "sources[0].kind: expected one of bluesky, booru, folder, mastodon, rss, x, got 'ftp'"),
    ('[[sources]]\nname = "x"\nkind = "rss"\nurl = "ftp://a"\n', "sources[0].url: expected an http(s) feed URL"),
    ('[[sources]]\nname = "x"\nkind = "folder"\nfolder = "a"\n', "sources[0].folder: unknown key"),
    ('[[sources]]\nname = "x"\nkind = "booru"\nratings = ["sfw"]\n', "sources[0].ratings: expected ratings"),
    ('[[sources]]\nname = "a"\nkind = "folder"\n[[sources]]\nname = "a"\nkind = "folder"\n', "used twice"),
    ('[log\n', "not valid TOML"),
])
def test_bad_config_gives_one_line_naming_file_and_key(tmp_path, body, message):
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(str(path) + ": ")
    assert message in text
    assert "\n" not in text


def test_gelbooru_needs_key_and_user_id(tmp_path, monkeypatch):
    monkeypatch.delenv("GELBOORU_API_KEY", raising=False)
    monkeypatch.delenv("GELBOORU_USER_ID", raising=False)
    body = '[[sources]]\nname = "g"\nkind = "booru"\napi = "gelbooru"\n'
    with pytest.raises(ConfigError, match="Gelbooru needs api_key and user_id"):
        load_config(write_config(tmp_path, body))
    monkeypatch.setenv("GELBOORU_API_KEY", "k" * 20)
    monkeypatch.setenv("GELBOORU_USER_ID", "123")
    assert load_config(write_config(tmp_path, body)).sources[0].kind == "booru"


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_secrets_never_reach_log_lines(tmp_path):
    secret = "sekrit-api-key-1234567890"
    body = f'[[sources]]\nname = "d"\nkind = "booru"\napi_key = "{secret}"\nlogin = "me"\n'
    load_config(write_config(tmp_path, body))
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    logging.getLogger("tastefeed.test").warning("GET https://x/posts.json?api_key=%s failed", secret)
    try:
        raise RuntimeError(f"boom {secret}")
    except RuntimeError:
        logging.getLogger("tastefeed.test").exception("with traceback")
    out = stream.getvalue()
    assert secret not in out
    assert "api_key=***" in out
    register_secret("another-secret-value")
    assert redact("x another-secret-value y") == "x *** y"
