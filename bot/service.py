"""``service install|uninstall|status``: run the daemon as a systemd service.

``install`` writes a unit that starts this installation's ``main.py run`` (absolute paths: this
Python, main.py, the config in use) from the current working folder, so relative paths in the
config mean what they mean for ``python main.py run`` here. A user unit by default
(``~/.config/systemd/user``), a system unit with ``--system`` (``/etc/systemd/system``, running as
the invoking user). The unit is ``Type=notify`` with a watchdog (the daemon speaks the protocol
itself, :mod:`bot.notify`), restarts on failure and is sandboxed: the disk is read-only except the
data folder, the folder sources' inboxes and the log file's folder. Secrets never go in the unit:
it reads an ``EnvironmentFile`` (mode 0600) that ``install`` creates with commented hints.
``--dry-run`` prints what would be written and run, as a unit file whose other lines are comments.
"""
from __future__ import annotations

import getpass
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bot.config import Config

UNIT = "tastefeed"
WATCHDOG_SEC = 60          # systemd restarts the daemon when its event loop is silent this long
RESTART_SEC = 10
START_TIMEOUT_SEC = 300    # the first start may build the model and load torch on a slow machine
SYSTEM_UNIT = Path("/etc/systemd/system") / f"{UNIT}.service"
SYSTEM_ENV = Path("/etc/tastefeed/env")
ROOT = Path(__file__).resolve().parents[1]
# What the environment file's hints name (README: Configuration).
SECRETS = ("DISCORD_TOKEN", "TASTEFEED_WEB_TOKEN", "DANBOORU_LOGIN", "DANBOORU_API_KEY", "GELBOORU_API_KEY",
           "GELBOORU_USER_ID", "MOEBOORU_LOGIN", "MOEBOORU_API_KEY", "X_BEARER_TOKEN", "MASTODON_ACCESS_TOKEN")


class ServiceError(Exception):
    """A service command that could not be done, phrased as one line for the user."""


@dataclass
class Plan:
    """Everything ``install`` writes and runs, worked out before anything is touched."""
    system: bool
    unit_path: Path
    env_path: Path
    user: str                   # who the daemon runs as
    folders: list[Path]         # ReadWritePaths=, created when missing
    text: str                   # the unit

    @property
    def systemctl(self) -> list[str]:
        return ["systemctl"] if self.system else ["systemctl", "--user"]


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def unit_path(system: bool) -> Path:
    return SYSTEM_UNIT if system else config_home() / "systemd" / "user" / f"{UNIT}.service"


def env_path(system: bool) -> Path:
    return SYSTEM_ENV if system else config_home() / "tastefeed" / "env"


def invoking_user() -> str:
    """The user who ran the command (through sudo: the one who ran sudo)."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def systemd_missing() -> str | None:
    """Why systemd cannot run the service here, or None when it can."""
    if shutil.which("systemctl") is None:
        return "systemd is not available here (no systemctl)"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not running here (this system was not booted with systemd)"
    return None


def run_command(cmd: list[str]) -> int:
    """Run ``cmd`` with its output on the terminal; its exit code."""
    try:
        return subprocess.run(cmd, check=False).returncode
    except OSError as e:
        raise ServiceError(f"cannot run {cmd[0]}: {e.strerror or e}") from None


# ---- the unit ------------------------------------------------------------------------------
def _escape(value: str) -> str:
    """A value with systemd's specifiers (``%``) taken literally."""
    return value.replace("%", "%%")


def _word(value: str, *, exec_line: bool = False) -> str:
    """One word of a space-separated setting (ExecStart=, ReadWritePaths=): quoted when it has
    spaces or quotes; on ExecStart= also ``$`` taken literally."""
    value = _escape(value)
    if exec_line:
        value = value.replace("$", "$$")
    if any(c in value for c in " \t\"'\\"):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def command_line(cfg: Config) -> list[str]:
    """This installation's ``run`` command, every path absolute (``-m bot.cli`` when installed
    without main.py)."""
    main = ROOT / "main.py"
    cmd = [str(Path(sys.executable).absolute())] + ([str(main)] if main.is_file() else ["-m", "bot.cli"])
    if cfg.path:
        cmd += ["--config", str(Path(cfg.path).resolve())]
    return cmd + ["run"]


def writable_folders(cfg: Config) -> list[Path]:
    """What the daemon writes: the data folder, the folder sources' inboxes (created on start),
    the log file's folder and the scheduled backups' folder; absolute, each once."""
    folders = [Path(cfg.data_dir)]
    folders += [Path(s.options["path"]) for s in cfg.sources if s.kind == "folder" and s.enabled]
    if cfg.log.file:
        folders.append(Path(cfg.log.file).parent)
    if cfg.backup.schedule:           # scheduled backups may go to another disk (backup.dest)
        folders.append(cfg.backup.dest_path(cfg.data_path))
    return list(dict.fromkeys(p.resolve() for p in folders))


TMP_DIRS = ("/tmp", "/var/tmp")   # what PrivateTmp=yes replaces with the service's own


def _in_tmp(path: Path) -> bool:
    path = Path(path).resolve()
    return any(path == Path(t).resolve() or Path(t).resolve() in path.parents for t in TMP_DIRS)


def plan(cfg: Config, *, system: bool) -> Plan:
    user = invoking_user()
    folders = writable_folders(cfg)
    env = env_path(system)
    lines = [
        f"# Written by `{' '.join(command_line(cfg)[:-1])} service install{' --system' if system else ''}`;",
        "# `service uninstall` removes it. Secrets go in the EnvironmentFile, never here.",
        "[Unit]",
        "Description=tastefeed: personal image recommendation daemon",
        *(["Wants=network-online.target", "After=network-online.target"] if system else []),
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={WATCHDOG_SEC}",
        "ExecStart=" + " ".join(_word(a, exec_line=True) for a in command_line(cfg)),
        "ExecReload=/bin/kill -HUP $MAINPID",   # `systemctl reload`: re-read the config (bot/reload.py)
        f"WorkingDirectory={_escape(str(Path.cwd()))}",
        f"EnvironmentFile={_escape(str(env))}",
        # Library caches (torchvision's downloaded weights) inside the data folder: the rest is read-only.
        "Environment=" + _word(f"XDG_CACHE_HOME={folders[0] / 'cache' / 'xdg'}"),
        *([f"User={user}"] if system else []),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        f"TimeoutStartSec={START_TIMEOUT_SEC}",
        f"TimeoutStopSec={math.ceil(cfg.daemon.stop_timeout) + 30}",
        "NoNewPrivileges=yes",
        # A private /tmp would hide a data or inbox folder that lives in /tmp itself.
        *(["PrivateTmp=yes"] if not any(_in_tmp(p) for p in [*folders, Path.cwd()]) else
          ["# PrivateTmp left off: a folder the daemon uses is in /tmp"]),
        "ProtectSystem=strict",
        "ReadWritePaths=" + " ".join(_word(str(p)) for p in folders),
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
    ]
    return Plan(system, unit_path(system), env, user, folders, "\n".join(lines) + "\n")


ENV_HINTS = "".join([
    "# Secrets for the tastefeed service, one NAME=value per line (no quotes needed). systemd reads\n",
    "# this file when the service starts; keep it private (mode 0600). After a change:\n",
    "#   python main.py service install   (or: systemctl [--user] restart tastefeed)\n",
    *(f"#{name}=\n" for name in SECRETS),
])


# ---- the commands --------------------------------------------------------------------------
def install(cfg: Config, *, system: bool = False, dry_run: bool = False) -> int:
    p = plan(cfg, system=system)
    existed = p.unit_path.exists()
    commands = [[*p.systemctl, "daemon-reload"],
                *([[*p.systemctl, "try-restart", UNIT]] if existed else []),   # a running one takes the new unit
                [*p.systemctl, "enable", "--now", UNIT]]
    if dry_run:   # printed as a unit file: everything but the unit is a comment
        print(f"# would write {p.unit_path}:")
        print(p.text, end="")
        if not p.env_path.exists():
            print(f"# would create {p.env_path} (mode 0600) for DISCORD_TOKEN and the other secrets")
        for folder in p.folders:
            if not folder.exists():
                print(f"# would create the folder {folder}")
        for cmd in commands:
            print(f"# would run: {' '.join(cmd)}")
        return 0
    try:
        _make_folders(p.folders, p.user if system else None)
        created = _write_env_file(p.env_path)
        p.unit_path.parent.mkdir(parents=True, exist_ok=True)
        p.unit_path.write_text(p.text)
    except OSError as e:
        where = e.filename or p.unit_path
        hint = f" (a system unit needs root: sudo {' '.join(command_line(cfg)[:-1])} service install --system)" \
            if system and isinstance(e, PermissionError) else ""
        raise ServiceError(f"cannot write {where}: {e.strerror or e}{hint}") from None
    print(f"wrote {p.unit_path}")
    print(f"{'created' if created else 'kept'} {p.env_path} (mode 0600): put DISCORD_TOKEN and other secrets there")
    missing = systemd_missing()
    if missing:
        raise ServiceError(f"{missing}, so the service is not started: on macOS use launchd "
                           "(README: Run it as a service), elsewhere run `python main.py run` in a terminal")
    for cmd in commands:
        _run_or_fail(cmd)
    scope = "" if system else " --user"
    print(f"tastefeed runs as a {'system' if system else 'user'} service; python main.py service status"
          f"{' --system' if system else ''}; logs: journalctl{scope} -u {UNIT} -f")
    if not system and not Path("/var/lib/systemd/linger", p.user).exists():
        print(f"note: a user service stops when you log out; to keep it running: loginctl enable-linger {p.user}")
    return 0


def uninstall(cfg: Config, *, system: bool = False, dry_run: bool = False) -> int:
    unit, env = unit_path(system), env_path(system)
    systemctl = ["systemctl"] if system else ["systemctl", "--user"]
    if not unit.exists():
        print(f"no unit at {unit}: nothing to uninstall")
        return 0
    use_systemd = systemd_missing() is None
    if dry_run:
        if use_systemd:
            print(f"would run: {' '.join([*systemctl, 'disable', '--now', UNIT])}")
        print(f"would remove {unit}")
        if use_systemd:
            print(f"would run: {' '.join([*systemctl, 'daemon-reload'])}")
        print(f"would keep {env} (your secrets)")
        return 0
    if use_systemd:
        _run_or_fail([*systemctl, "disable", "--now", UNIT])
    try:
        unit.unlink()
    except OSError as e:
        raise ServiceError(f"cannot remove {unit}: {e.strerror or e}") from None
    print(f"removed {unit}")
    if use_systemd:
        _run_or_fail([*systemctl, "daemon-reload"])
    if env.exists():
        print(f"kept {env} (your secrets); delete it if you no longer need it")
    return 0


def status(cfg: Config, *, system: bool = False) -> int:
    """``systemctl status`` and the last log lines; 0 when the service is running."""
    missing = systemd_missing()
    if missing:
        print(f"{missing}: on macOS see the launchd recipe in README (Run it as a service); "
              "elsewhere run `python main.py run` in a terminal (or under your init system)")
        return 1
    unit = unit_path(system)
    if not unit.exists():
        print(f"not installed (no {unit}): python main.py service install{' --system' if system else ''}")
        return 1
    user = [] if system else ["--user"]
    code = run_command(["systemctl", *user, "status", "--no-pager", UNIT])
    run_command(["journalctl", *user, "-u", UNIT, "-n", "20", "--no-pager"])
    return 0 if code == 0 else 1


def _run_or_fail(cmd: list[str]) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    code = run_command(cmd)
    if code != 0:
        raise ServiceError(f"`{' '.join(cmd)}` failed (exit {code})")


def _make_folders(folders: list[Path], owner: str | None) -> None:
    """Create the missing ones (ReadWritePaths= must exist, or the service cannot start); as root
    for another user, hand them to that user."""
    for folder in folders:
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        if owner and os.geteuid() == 0 and owner != "root":
            shutil.chown(folder, owner)


def _write_env_file(path: Path) -> bool:
    """Create ``path`` (mode 0600) with commented hints, or make an existing one private; True
    when created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return False
    with os.fdopen(fd, "w") as f:
        f.write(ENV_HINTS)
    return True
