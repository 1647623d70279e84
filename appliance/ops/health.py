"""Asking the box's services how they are, from the machine they run on. The image's boot check (r1box-health),
the container's HEALTHCHECK and `r1box health` all ask through here, so they agree with the services on where they
listen and whether they speak TLS ([server] for `r1box serve`, [model_server] for `r1box model`). It imports no model runtime: a HEALTHCHECK runs every few
seconds."""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from collections.abc import Callable

from appliance.config import ServerConfig


def probe(base_url: str, timeout_s: float = 5.0) -> dict | None:
    """/healthz's answer at base_url (a ServerConfig's own_url), or None when nothing answers. This asks the box's
    own listener, so its (often self-signed) certificate needs no check here; a client elsewhere pins it by
    fingerprint."""
    own_certificate = ssl.create_default_context()
    own_certificate.check_hostname, own_certificate.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(base_url + "/healthz", timeout=timeout_s, context=own_certificate) as r:
            return json.load(r)
    except (OSError, ValueError):  # refused, timed out, a 5xx, or not JSON
        return None


def healthy(answer: dict | None) -> bool:
    return bool(answer) and answer.get("status") in ("ok", "degraded")


def wait(server: ServerConfig, timeout_s: float, give_up: Callable[[], bool] = lambda: False,
         every_s: float = 2.0, until: Callable[[dict], bool] = lambda answer: True) -> dict | None:
    """Asks until the service answers (and its answer satisfies `until`), `timeout_s` passes or `give_up()` says
    it never will (a failed unit); the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe(server.own_url)
        if (answer is not None and until(answer)) or time.monotonic() >= deadline or give_up():
            return answer
        time.sleep(every_s)
