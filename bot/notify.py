"""systemd's notify protocol, spoken by the daemon itself (no dependency): ``sd_notify`` in Python.

Under a ``Type=notify`` unit, systemd passes ``$NOTIFY_SOCKET`` (a datagram socket: a path, or an
abstract socket written ``@name``). The daemon sends ``READY=1`` once it is up, ``STATUS=...`` (the
line ``systemctl status`` shows), ``STOPPING=1`` when it begins to stop, and, with ``WatchdogSec=``
in the unit (``$WATCHDOG_USEC``), ``WATCHDOG=1`` at half that interval. The pings come from a task
on the daemon's event loop, so a loop that is blocked stops pinging and systemd restarts the
daemon. Without ``$NOTIFY_SOCKET`` (run in a terminal) every call here does nothing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("tastefeed.daemon")

STATUS_EVERY = 30.0   # seconds between STATUS= updates


def send(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) to systemd in one datagram; False when not under
    systemd or the socket refused it (a service manager gone away must not stop the daemon)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]          # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode("utf-8", "replace"), address)
    except OSError as e:
        log.debug("notify %s: %s", address, e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when systemd
    expects none from this process (no watchdog, or it is meant for another pid)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1e6


async def _ping(interval: float) -> None:
    while True:
        send("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _report(summary: Callable[[], Awaitable[str]]) -> None:
    while True:
        try:
            send(f"STATUS={await summary()}")
        except Exception as e:  # noqa: BLE001 - a status line is never worth stopping for
            log.debug("status line: %s", e)
        await asyncio.sleep(STATUS_EVERY)


def start(summary: Callable[[], Awaitable[str]]) -> list[asyncio.Task]:
    """Say ``READY=1`` and start the watchdog pings and status updates (cancel the tasks returned
    to stop them); nothing when not under systemd. The pings have their own task so that a slow
    status query can never delay them."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return []
    send("READY=1")
    tasks = [asyncio.create_task(_report(summary), name="notify-status")]
    interval = watchdog_interval()
    if interval is not None:
        tasks.append(asyncio.create_task(_ping(interval), name="notify-watchdog"))
    return tasks
