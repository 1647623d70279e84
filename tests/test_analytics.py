"""The dashboard's numbers on a real database: rollups kept by triggers as the service writes its rows, read back
per local day; a database upgraded with messages already in it gets them counted; a user's deleted messages take
their activity days with them."""

import sqlite_utils

from appliance.admin import analytics
from appliance.store.database import MIGRATIONS, migrate, open_database
from tests.admin_site import EXPECTED, SEEDED_RANGE, _at, seed, seed_messages


def _range(offset_s: int = 0) -> analytics.Range:
    return analytics.Range.parse(SEEDED_RANGE["from"], SEEDED_RANGE["to"], offset_s, None)


def test_the_dashboard_holds_the_seeded_numbers(tmp_path):
    db = open_database(tmp_path / "a.db")
    seed(db)
    assert analytics.dashboard(db, _range()) == EXPECTED


def test_days_follow_the_office_time_zone(tmp_path):
    db = open_database(tmp_path / "a.db")
    analytics.set_clock(db, 8 * 3600)
    seed(db)
    data = analytics.dashboard(db, _range(8 * 3600))
    # 23:00 UTC on the 3rd is 07:00 on the 4th in UTC+8, so it leaves the range; 09:00 UTC is 17:00 there
    assert data["messages"]["per_day"] == [3, 2, 0] and data["messages"]["per_hour"][17] == 2
    assert data["active_users"]["per_day"] == [2, 1, 0]


def test_an_upgraded_database_counts_what_it_had(tmp_path):
    db = sqlite_utils.Database(tmp_path / "old.db")
    db["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    for name, step in MIGRATIONS:
        if name.startswith("0008"):
            break
        step(db)
        db["_migrations"].insert({"name": name, "applied_at": 0.0})
    seed_messages(db)
    assert migrate(db) == [name for name, _ in MIGRATIONS if name >= "0008"]
    fresh = open_database(tmp_path / "fresh.db")
    seed_messages(fresh)
    for query in (analytics.messages, analytics.active_users, analytics.latency):
        assert query(db, _range()) == query(fresh, _range())


def test_deleting_a_users_messages_removes_their_activity_days(tmp_path):
    db = open_database(tmp_path / "a.db")
    seed(db)
    db.execute("DELETE FROM inbound WHERE account = 'wx1' AND user = 'a' AND received_at < ?", [_at(2, 0)])
    db.conn.commit()
    assert analytics.active_users(db, _range()) == {"per_day": [1, 1, 1], "total": 3}
    db.execute("DELETE FROM inbound WHERE user = 'a'")
    db.conn.commit()
    assert db.execute("SELECT count(*) FROM user_days WHERE user = 'a'").fetchone()[0] == 0
    # the hourly counts carry no identity and stay
    assert analytics.messages(db, _range())["per_day"] == [3, 2, 1]


def test_a_bad_range_is_refused():
    import pytest

    for first, last in (("2025-03-05", "2025-03-01"), ("2020-01-01", "2025-01-01"), ("yesterday", None)):
        with pytest.raises(ValueError):
            analytics.Range.parse(first, last, 0, None)


def test_the_tables_the_migrations_make(tmp_path):
    db = open_database(tmp_path / "a.db")
    assert db["command_uses"].columns_dict == {"id": int, "account": str, "command": str, "at": float}
    assert db["inbound_hourly"].columns_dict == {"hour": int, "account": str, "messages": int, "passive": int,
                                                 "push": int, "pull": int}
    assert db["admin_users"].columns_dict == {"name": str, "role": str, "password_hash": str, "created_at": float}
    assert db["admin_api_keys"].columns_dict == {"id": int, "name": str, "role": str, "key_hash": str,
                                                 "created_by": str, "created_at": float, "revoked_at": float}


async def test_commands_and_filter_hits_from_the_dialog_reach_the_dashboard(tmp_path):
    import datetime as dt

    from appliance.backends.pool import Backends
    from appliance.config import DialogConfig
    from appliance.dialog.engine import Dialog
    from appliance.dialog.filter import WordFilter
    from appliance.store.database import Store

    store = Store(tmp_path / "dialog.db")
    store.open()
    try:
        no_model = Backends((), session=None)  # commands and filtered words never reach one
        dialog = Dialog(no_model, store, DialogConfig(max_tokens=4), WordFilter(["违禁词"]))
        for text in ("#help", "帮助", "#清除记忆", "/think on", "这是违禁词吗"):
            await dialog.answer("wx1", "u1", text)
        today = dt.datetime.now(dt.timezone.utc).date().isoformat()
        data = await store.run(analytics.dashboard, analytics.Range.parse(today, today, 0, None))
    finally:
        store.close()
    assert data["top_commands"] == [["help", 2], ["reset", 1], ["think_on", 1]]
    assert data["filter_hits"] == [1]
