"""Reading conversations back, opened: the one way pages and exports read what users said and what the box answered.

Users are named by their keyed hash (Vault.user_hash, the `user` of every table and the `user_id` of their audit
entries); an OpenID is never handed out. A row whose sealed values fail their check comes back with its text None
and an `error` that says why, so one altered row never hides the rest. Run these on the store's thread:
`await store.run(conversation, store.vault, account, user_hash)`.
"""

from __future__ import annotations

from appliance.errors import UnreadableValue
from appliance.store.vault import Vault


def users(db, account: str | None = None, limit: int = 100) -> list[dict]:
    """Users with messages, the most recently active first: account, user (hash), messages, last_at."""
    # a user's messages: not platform events, nor the stored rest of a long answer
    where, params = ("AND account = ?", [account]) if account else ("", [])
    rows = db.execute("SELECT account, user, count(*), max(received_at) FROM inbound WHERE kind NOT LIKE 'event%' "
                      f"AND dedup_key NOT LIKE '%:rest' {where} GROUP BY account, user "
                      "ORDER BY max(received_at) DESC LIMIT ?", [*params, limit]).fetchall()
    return [{"account": a, "user": u, "messages": n, "last_at": at} for a, u, n, at in rows]


def messages(db, vault: Vault, account: str, user_hash: str, limit: int = 200) -> list[dict]:
    """A user's messages in order, each with the answer it got: id, kind, question, answer, status, delivery,
    received_at, answered_at, and `error` when the row cannot be opened."""
    cursor = db.execute("SELECT id, dedup_key, kind, content, answer, status, delivery, received_at, answered_at "
                        "FROM inbound WHERE account = ? AND user = ? ORDER BY id DESC LIMIT ?",
                        [account, user_hash, limit])
    out = []
    for row_id, key, kind, content, answer, status, delivery, received_at, answered_at in reversed(cursor.fetchall()):
        item = {"id": row_id, "kind": kind, "question": None, "answer": None, "status": status, "delivery": delivery,
                "received_at": received_at, "answered_at": answered_at}
        try:
            item["question"] = vault.unseal(content, "inbound", "content", key)
            item["answer"] = vault.unseal(answer, "inbound", "answer", key)
        except UnreadableValue as e:
            item["error"] = str(e)
        out.append(item)
    return out


def conversation(db, vault: Vault, account: str, user_hash: str, limit: int = 200) -> list[dict]:
    """The dialog memory of a user in order: id, role, content, created_at, and `error` for a row that cannot be
    opened."""
    cursor = db.execute("SELECT id, role, content, created_at FROM turns WHERE account = ? AND user = ? "
                        "ORDER BY id DESC LIMIT ?", [account, user_hash, limit])
    out = []
    for row_id, role, content, created_at in reversed(cursor.fetchall()):
        item = {"id": row_id, "role": role, "content": None, "created_at": created_at}
        try:
            item["content"] = vault.unseal(content, "turns", "content", row_id)
        except UnreadableValue as e:
            item["error"] = str(e)
        out.append(item)
    return out
