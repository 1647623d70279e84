"""Talking to systemd when it runs the service (Type=notify): READY=1 once the model is loaded and the listener
answers, WATCHDOG=1 from the event loop (so a hung loop gets the service restarted), STOPPING=1 on shutdown.

systemd arms the watchdog when the process starts, not when it is ready. A model's load (onnxruntime building its
session, the int4 kernel repacking weights) holds the interpreter for seconds at a time, and on a slow or busy CPU
for longer than WatchdogSec: on the firmware image under emulation, as one box of a pair, the model unit was killed
at 142 s into a load that takes about 150. So until READY=1 the watchdog is stretched to STARTING_WATCHDOG_S (the
units' TimeoutStartSec is what bounds a start) and set back to WatchdogSec= with READY=1.

A plain datagram to $NOTIFY_SOCKET, as sd_notify(3) describes; without that variable (a terminal, the tests) all of
this does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from aiohttp import web

from appliance.app_keys import LISTENER

log = logging.getLogger(__name__)

STARTING_WATCHDOG_S = 900  # the units' TimeoutStartSec


def notify(state: str) -> bool:
    """Send one state line to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval() -> float | None:
    """Half the period systemd expects pings in (WatchdogSec=), or None when it expects none of this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def _listening(host: str, port: int) -> None:
    """Return once the service's own listener accepts a connection (it opens after every cleanup context)."""
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.2)


async def _ready_when_listening(host: str, port: int) -> None:
    await _listening(host, port)
    ready = "READY=1\nSTATUS=serving"
    if watchdog_interval():
        ready += f"\nWATCHDOG_USEC={os.environ['WATCHDOG_USEC']}"  # WatchdogSec= again, now that it serves
    notify(ready)
    log.info("told systemd the service is ready")


async def _feed_watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def systemd_ctx(app: web.Application):
    """First in the cleanup contexts, so the watchdog is fed while the model loads."""
    if not os.environ.get("NOTIFY_SOCKET"):
        yield
        return
    server, interval = app[LISTENER], watchdog_interval()
    if interval:
        notify(f"WATCHDOG_USEC={STARTING_WATCHDOG_S * 1_000_000}")
    tasks = [asyncio.create_task(_feed_watchdog(interval))] if interval else []
    if server.port:  # an ephemeral port cannot be probed; nothing runs under systemd with one
        tasks.append(asyncio.create_task(_ready_when_listening(server.own_address, server.port)))
    yield
    notify("STOPPING=1")
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
