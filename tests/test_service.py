"""The daemon as a systemd service: the unit ``service install`` writes (and that systemd accepts
it), install/uninstall/status around systemctl (mocked: the machine's systemd is never touched),
the notify protocol against a datagram socket standing in for systemd, and the logs under
journald and in a rotating file."""
from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from bot import notify, service
from bot.config import load_config
from bot.daemon import Daemon
from bot.logs import register_secret, setup_logging
from tests.helpers import MAIN, cli, make_config

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME in tmp_path (nothing is written to the real one); the working folder is tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def systemctl(monkeypatch):
    """systemd present, its commands recorded instead of run (each answers ``codes[name]``, else 0)."""
    calls, codes = [], {}
    monkeypatch.setattr(service, "systemd_missing", lambda: None)

    def run(cmd):
        calls.append(cmd)
        return codes.get(cmd[-1] if cmd[0] == "systemctl" else cmd[0], 0)
    monkeypatch.setattr(service, "run_command", run)
    return calls, codes


def service_config(tmp_path):
    """A config with a log file and a token (which must stay out of the unit)."""
    cfg = make_config(tmp_path, '[log]\nfile = "logs/tastefeed.log"\n[web]\ntoken = "web-token-not-for-units"\n')
    return tmp_path / "config.toml", cfg


def settings(text: str) -> dict[str, str]:
    """The unit's ``Key=value`` lines; each key is set once."""
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")]
    assert len({key for key, _ in pairs}) == len(pairs), pairs
    return dict(pairs)


def test_user_unit_runs_this_installation_sandboxed_and_dry_run_touches_nothing(tmp_path, home, monkeypatch):
    monkeypatch.setattr(service, "TMP_DIRS", ("/nonexistent-tmp",))   # tmp_path itself lives in /tmp
    monkeypatch.setenv("DISCORD_TOKEN", "discord-token-not-for-units")
    config, cfg = service_config(tmp_path)
    out = cli(tmp_path, "--config", config, "service", "install", "--dry-run")
    assert out.returncode == 0, out.stderr
    unit = settings(out.stdout)
    assert unit["ExecStart"] == f"{sys.executable} {MAIN} --config {config} run"
    assert os.path.isabs(sys.executable)
    assert unit["WorkingDirectory"] == str(tmp_path)
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main" and unit["WatchdogSec"] == "60"
    assert unit["Restart"] == "on-failure" and int(unit["RestartSec"]) > 0
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"   # `systemctl reload` re-reads the config
    assert int(unit["TimeoutStopSec"]) > cfg.daemon.stop_timeout
    assert unit["EnvironmentFile"] == str(home / ".config" / "tastefeed" / "env")
    assert unit["NoNewPrivileges"] == "yes" and unit["PrivateTmp"] == "yes" and unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"].split() == [str(tmp_path / "data"), str(tmp_path / "inbox"), str(tmp_path / "logs")]
    assert unit["WantedBy"] == "default.target" and "User" not in unit
    assert "discord-token-not-for-units" not in out.stdout and "web-token-not-for-units" not in out.stdout
    assert "# would write " + str(home / ".config" / "systemd" / "user" / "tastefeed.service") in out.stdout
    assert "# would run: systemctl --user daemon-reload\n# would run: systemctl --user enable --now tastefeed" \
        in out.stdout
    assert all(line.startswith("#") for line in out.stdout.splitlines()[out.stdout.splitlines().index(
        "WantedBy=default.target") + 1:])   # the whole output is a unit file
    assert list(home.iterdir()) == [] and not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


def test_system_unit_runs_as_the_invoking_user(tmp_path, home, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    config, cfg = service_config(tmp_path)
    out = cli(tmp_path, "--config", config, "service", "install", "--system", "--dry-run")
    assert out.returncode == 0, out.stderr
    unit = settings(out.stdout)
    assert unit["User"] == "alice" and unit["WantedBy"] == "multi-user.target"
    assert unit["After"] == "network-online.target"
    assert unit["EnvironmentFile"] == "/etc/tastefeed/env"
    assert unit["ExecStart"] == f"{sys.executable} {MAIN} --config {config} run"
    assert "# would write /etc/systemd/system/tastefeed.service" in out.stdout
    assert "# would run: systemctl daemon-reload\n" in out.stdout and "--user" not in out.stdout
    assert list(home.iterdir()) == []


def test_without_a_config_the_unit_runs_from_the_working_folder(tmp_path, home):
    out = cli(tmp_path, "service", "install", "--dry-run")
    unit = settings(out.stdout)
    assert unit["ExecStart"] == f"{sys.executable} {MAIN} run"
    assert unit["WorkingDirectory"] == str(tmp_path)
    assert unit["ReadWritePaths"] == f"{tmp_path / 'data'} {tmp_path / 'inbox'}"


def test_paths_with_spaces_percent_and_dollar_are_quoted_and_escaped(tmp_path, home):
    folder = tmp_path / "my 100% $HOME"
    folder.mkdir()
    (folder / "config.toml").write_text('data_dir = "da ta"\n')
    text = service.plan(load_config(folder / "config.toml"), system=False).text
    unit = settings(text)
    escaped = str(folder).replace("%", "%%")
    assert unit["ExecStart"].endswith(f' --config "{escaped.replace("$", "$$")}/config.toml" run')
    assert unit["WorkingDirectory"] == str(tmp_path)
    assert unit["ReadWritePaths"].startswith(f'"{tmp_path}/da ta" ')


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("system", [False, True])
def test_systemd_analyze_verifies_the_unit(tmp_path, home, system):
    folder = tmp_path / "a b%c $d"
    folder.mkdir()
    config, cfg = service_config(folder)
    p = service.plan(cfg, system=system)
    unit = tmp_path / "tastefeed.service"
    unit.write_text(p.text.replace(f"EnvironmentFile={p.env_path}", f"EnvironmentFile={home / 'env'}"))
    (home / "env").write_text(service.ENV_HINTS)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tastefeed.service" not in done.stderr, done.stderr   # no warning about any line of it


def test_install_writes_the_unit_and_a_private_env_file_then_starts_it(tmp_path, home, systemctl):
    calls, _ = systemctl
    config, cfg = service_config(tmp_path)
    out = cli(tmp_path, "--config", config, "service", "install")
    assert out.returncode == 0, out.stderr
    unit = home / ".config" / "systemd" / "user" / "tastefeed.service"
    env = home / ".config" / "tastefeed" / "env"
    assert unit.read_text() == service.plan(cfg, system=False).text
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "#DISCORD_TOKEN=" in env.read_text() and "#X_BEARER_TOKEN=" in env.read_text()
    assert all((tmp_path / name).is_dir() for name in ("data", "inbox", "logs"))  # ReadWritePaths must exist
    assert calls == [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", "tastefeed"]]

    # again: the secrets stay, the file is made private again, a running service takes the new unit
    env.write_text("DISCORD_TOKEN=mine\n")
    env.chmod(0o644)
    calls.clear()
    out = cli(tmp_path, "--config", config, "service", "install")
    assert out.returncode == 0, out.stderr
    assert env.read_text() == "DISCORD_TOKEN=mine\n" and stat.S_IMODE(env.stat().st_mode) == 0o600
    assert calls == [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "try-restart", "tastefeed"],
                     ["systemctl", "--user", "enable", "--now", "tastefeed"]]

    calls.clear()
    out = cli(tmp_path, "--config", config, "service", "uninstall", "--dry-run")
    assert out.returncode == 0 and calls == [] and unit.exists()
    out = cli(tmp_path, "--config", config, "service", "uninstall")
    assert out.returncode == 0, out.stderr
    assert calls == [["systemctl", "--user", "disable", "--now", "tastefeed"], ["systemctl", "--user", "daemon-reload"]]
    assert not unit.exists() and env.read_text() == "DISCORD_TOKEN=mine\n"
    assert f"kept {env}" in out.stdout


def test_system_install_writes_where_told_with_the_user_and_fails_in_one_line(tmp_path, home, systemctl, monkeypatch):
    calls, codes = systemctl
    monkeypatch.setattr(service, "SYSTEM_UNIT", tmp_path / "etc" / "tastefeed.service")
    monkeypatch.setattr(service, "SYSTEM_ENV", tmp_path / "etc" / "tastefeed" / "env")
    monkeypatch.setenv("SUDO_USER", "root")
    codes["tastefeed"] = 1   # enable --now fails
    out = cli(tmp_path, "service", "install", "--system")
    assert out.returncode == 1
    assert out.stderr == "error: `systemctl enable --now tastefeed` failed (exit 1)\n"
    assert "User=root\n" in (tmp_path / "etc" / "tastefeed.service").read_text()
    assert stat.S_IMODE((tmp_path / "etc" / "tastefeed" / "env").stat().st_mode) == 0o600
    assert calls[0] == ["systemctl", "daemon-reload"]


def test_without_systemd_install_writes_the_unit_and_says_what_to_do(tmp_path, home, monkeypatch):
    monkeypatch.setattr(service.shutil, "which", lambda name: None)
    monkeypatch.setattr(service, "run_command", lambda cmd: pytest.fail(f"ran {cmd}"))
    out = cli(tmp_path, "service", "install")
    assert out.returncode == 1
    assert (home / ".config" / "systemd" / "user" / "tastefeed.service").exists()
    assert out.stderr.startswith("error: systemd is not available here (no systemctl), so the service is not started")
    assert "launchd" in out.stderr and "python main.py run" in out.stderr and out.stderr.count("\n") == 1
    out = cli(tmp_path, "service", "status")
    assert out.returncode == 1
    assert "systemd is not available here" in out.stdout and "launchd" in out.stdout
    out = cli(tmp_path, "service", "uninstall")
    assert out.returncode == 0 and not (home / ".config" / "systemd" / "user" / "tastefeed.service").exists()


def test_status_wraps_systemctl_and_journalctl(tmp_path, home, systemctl):
    calls, codes = systemctl
    out = cli(tmp_path, "service", "status")
    assert out.returncode == 1 and "not installed" in out.stdout and calls == []
    cli(tmp_path, "service", "install")
    calls.clear()
    out = cli(tmp_path, "service", "status")
    assert out.returncode == 0
    assert calls == [["systemctl", "--user", "status", "--no-pager", "tastefeed"],
                     ["journalctl", "--user", "-u", "tastefeed", "-n", "20", "--no-pager"]]
    codes["tastefeed"] = 3   # inactive
    assert cli(tmp_path, "service", "status").returncode == 1


# ---- the notify protocol -----------------------------------------------------------------------
def fake_systemd(tmp_path, monkeypatch, watchdog_usec: int | None = 200_000) -> socket.socket:
    """A datagram socket where systemd's would be, named by NOTIFY_SOCKET (and the watchdog on)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if watchdog_usec:
        monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
    else:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    return sock


def received(sock: socket.socket) -> list[str]:
    """The fields of every datagram waiting, in order."""
    fields = []
    while True:
        try:
            fields += sock.recv(4096).decode().split("\n")
        except BlockingIOError:
            return fields


async def test_daemon_says_ready_pings_from_its_loop_and_says_stopping(tmp_path, monkeypatch):
    sock = fake_systemd(tmp_path, monkeypatch)
    daemon = Daemon(make_config(tmp_path))
    assert received(sock) == []
    await daemon.start()
    try:
        assert received(sock)[0] == "READY=1"
        await asyncio.sleep(1.0)
        fields = received(sock)
        assert fields.count("WATCHDOG=1") >= 5           # every 0.1 s: half of WATCHDOG_USEC
        assert "STATUS=scored 0, pending 0, sources ok 1/1" in fields

        async def stall():                               # a blocked event loop
            received(sock)
            time.sleep(1.0)
            return received(sock)
        assert await asyncio.create_task(stall()) == []  # no ping while the loop was blocked
        await asyncio.sleep(0.5)
        assert received(sock).count("WATCHDOG=1") >= 2   # and they come back with it
    finally:
        await daemon.stop()
    fields = received(sock)
    assert "STOPPING=1" in fields and "READY=1" not in fields
    await asyncio.sleep(0.3)
    assert received(sock) == []                          # no pings once stopped
    sock.close()


async def test_no_pings_without_a_watchdog_or_for_another_pid(tmp_path, monkeypatch):
    sock = fake_systemd(tmp_path, monkeypatch, watchdog_usec=None)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 0.1

    async def summary():
        return "fine"
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    tasks = notify.start(summary)
    await asyncio.sleep(0.35)
    for task in tasks:
        task.cancel()
    assert received(sock) == ["READY=1", "STATUS=fine"]
    sock.close()


def test_notify_reaches_an_abstract_socket_and_is_a_no_op_without_systemd(monkeypatch):
    name = f"tastefeed-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert notify.send("READY=1", "STATUS=up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    sock.close()
    assert not notify.send("READY=1")                    # nobody listens any more: no exception
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify.send("READY=1")


# ---- logs --------------------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    names = ["", "apscheduler", "discord", "PIL", "urllib3", "matplotlib"]
    levels = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)
            handler.close()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_under_journald_lines_carry_a_priority_and_no_timestamp(tmp_path, monkeypatch, restore_logging):
    register_secret("journal-secret-value")
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("INFO", stream)
        logging.getLogger("tastefeed.test").warning("token journal-secret-value\nforged line")
        logging.getLogger("tastefeed.test").info("fine")
        stream.seek(0)
        assert stream.read() == "<4>WARNING tastefeed.test: token ***\\nforged line\n<6>INFO tastefeed.test: fine\n"

        # the variable names another stream (inherited by a child whose stderr was redirected)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        other = io.StringIO()
        setup_logging("INFO", other)
        logging.getLogger("tastefeed.test").info("stamped")
        assert STAMP.match(other.getvalue())


def test_log_file_is_stamped_masked_and_rotated(tmp_path, restore_logging):
    register_secret("file-secret-value")
    log_file = tmp_path / "logs" / "tastefeed.log"
    stream = io.StringIO()
    setup_logging("INFO", stream, file=str(log_file), max_mb=0.001, keep=2)   # rotate at ~1 kB
    for i in range(100):
        logging.getLogger("tastefeed.test").info("line %d with file-secret-value", i)
    text = log_file.read_text()
    assert all(STAMP.match(line) and line.endswith(" with ***") for line in text.splitlines())
    assert "line 99 with ***" in text and len(text) <= 1100
    assert sorted(p.name for p in log_file.parent.iterdir()) == ["tastefeed.log", "tastefeed.log.1", "tastefeed.log.2"]
    assert "line 99 with ***" in stream.getvalue() and "file-secret-value" not in stream.getvalue()


@pytest.mark.slow   # a real daemon process: about 12 s
def test_run_as_systemd_runs_it(tmp_path):
    """``main.py run`` under a stand-in systemd: READY=1, journal lines without timestamps, the log
    file with them, STOPPING=1 on SIGTERM and a clean exit."""
    config, cfg = service_config(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(120)
    with open(tmp_path / "journal", "w+") as journal:
        st = os.fstat(journal.fileno())
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000",
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen([sys.executable, str(MAIN), "--config", str(config), "run"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=journal, env=env)
        try:
            assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
            sock.settimeout(5)
            assert b"WATCHDOG=1" in [sock.recv(4096) for _ in range(3)]
            proc.send_signal(signal.SIGTERM)
            fields = []
            while b"STOPPING=1" not in fields:
                fields += sock.recv(4096).split(b"\n")
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            sock.close()
        journal.seek(0)
        lines = journal.read().splitlines()
    assert lines and not any(STAMP.match(line) for line in lines), lines
    assert any(line.startswith("<6>INFO tastefeed.daemon: stopped") for line in lines)
    logged = (tmp_path / "logs" / "tastefeed.log").read_text().splitlines()
    assert logged and all(STAMP.match(line) for line in logged) and logged[-1].endswith("tastefeed.daemon: stopped")


def test_a_data_folder_in_tmp_keeps_the_real_tmp(tmp_path, home, monkeypatch):
    monkeypatch.setattr(service, "TMP_DIRS", (str(tmp_path),))
    config, _ = service_config(tmp_path)
    out = cli(tmp_path, "--config", config, "service", "install", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "PrivateTmp" not in settings(out.stdout)    # a private /tmp would hide the data folder


def test_scheduled_backups_to_another_disk_are_writable_in_the_unit(tmp_path, home, monkeypatch):
    monkeypatch.setattr(service, "TMP_DIRS", ("/nonexistent-tmp",))
    make_config(tmp_path, f'[backup]\nschedule = "0 3 * * *"\ndest = "{tmp_path / "nas"}"\n')
    out = cli(tmp_path, "--config", tmp_path / "config.toml", "service", "install", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "nas") in settings(out.stdout)["ReadWritePaths"].split()
