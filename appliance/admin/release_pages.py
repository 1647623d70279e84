"""The release page: the candidate beside the serving model, the shares and sample sizes, the rule's three figures
against their thresholds, a chart of both variants over the release, and the buttons that start, move on, promote,
roll back or stop it (admin role; each act audited by appliance/release/records.py). The page changes the store;
the service's ReleaseManager follows at once."""

from __future__ import annotations

import asyncio
import datetime as dt

from aiohttp import web

from appliance.admin.server import MAIN, need, render
from appliance.app_keys import CONFIG, RELEASE, STORE
from appliance.errors import R1boxError
from appliance.release import records
from appliance.release.commands import target_of

routes = web.RouteTableDef()
ACTS = {"ab": "ab", "promote": "promoted", "rollback": "rolled_back", "stop": "stopped"}


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _past(db) -> list[dict]:
    return [{**r, "started": _when(r["started_at"]), "ended": _when(r["ended_at"])}
            for r in db["releases"].rows_where(select="id, candidate, phase, started_by, started_at, ended_at",
                                                order_by="id DESC", limit=10)]


@routes.get("/release")
@need("viewer")
async def release_page(request: web.Request, **context) -> web.Response:
    store, rule = request.app[STORE], request.app[CONFIG].release
    release = await store.run(records.latest)
    past = await store.run(_past)
    manager = _manager(request)
    return render(request, "release.html", release=release, figures=(release.figures if release else {}),
                  past=past, rule=rule, dropped=manager.dropped if manager else 0,
                  since=_when(release.phase_at) if release else "", **context)


@routes.get("/release/data")
@need("viewer")
async def release_data(request: web.Request) -> web.Response:
    store = request.app[STORE]
    release = await store.run(records.latest)
    history = await store.run(records.history, release.id) if release else []
    return web.json_response({"release": release.id if release else None, "history": history},
                             headers={"Cache-Control": "no-store"})


@routes.post("/release/start")
@need("admin")
async def release_start(request: web.Request) -> web.Response:
    form, config = await request.post(), request.app[CONFIG]
    try:
        target = str(form.get("target", "")).strip()[:500]
        shares = [float(form.get(k) or default) for k, default in (("shadow_share", config.release.shadow_share),
                                                                     ("ab_share", config.release.ab_share))]
        if not target or not all(0 <= s <= 1 for s in shares):
            raise R1boxError("a candidate (artifact directory or backend URL) and shares between 0 and 1 are needed")
        label, url, artifact = await asyncio.get_running_loop().run_in_executor(
            None, target_of, config, target, str(form.get("name", "")).strip()[:64] or None)
        release = await request.app[STORE].run(records.start, label, url, str(form.get("key_env", ""))[:64],
                                               artifact, *shares, form.get("auto") == "on",
                                               request["actor"].name, request.remote)
    except (R1boxError, ValueError) as e:
        return await release_page(request, error=str(e))
    await _follow(request)
    return await release_page(request, notice=f"Release {release.id} of {release.candidate} started in shadow.")


@routes.post("/release/{act:ab|promote|rollback|stop}")
@need("admin")
async def release_act(request: web.Request) -> web.Response:
    act, store = request.match_info["act"], request.app[STORE]
    running = await store.run(records.active)
    try:
        if running is None:
            raise records.ReleaseError("no release is running")
        await store.run(records.change_phase, running.id, ACTS[act], request["actor"].name, running.figures,
                        request.remote)
    except records.ReleaseError as e:
        return await release_page(request, error=str(e))
    await _follow(request)
    return await release_page(request, notice=f"Release {running.id}: {ACTS[act].replace('_', ' ')}.")


def _manager(request: web.Request):
    main = request.app.get(MAIN)
    return main.get(RELEASE) if main is not None else None


async def _follow(request: web.Request) -> None:
    if manager := _manager(request):
        await manager.follow()
