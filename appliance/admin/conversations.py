"""What the conversations page reads: every read of message contents for a person goes through here, so the
store's decryption has one place to plug in and each view is audited by its caller."""

from __future__ import annotations

from appliance.audit import pseudonym


def recent_users(db, limit: int = 200) -> list[dict]:
    """Users with the latest activity first: account, the stored user id, messages, last message time."""
    rows = db.execute("SELECT account, user, count(*), max(received_at) FROM inbound WHERE kind NOT LIKE 'event%' "
                      "AND dedup_key NOT LIKE '%:rest' GROUP BY account, user ORDER BY 4 DESC LIMIT ?", [limit])
    return [{"account": a, "user": u, "pseudonym": pseudonym(a, u), "messages": n, "last": last}
            for a, u, n, last in rows]


def conversation(db, account: str, user: str, limit: int = 200) -> list[dict]:
    """One user's latest messages and the answers they got, oldest first."""
    rows = db.execute("SELECT received_at, kind, content, answer, delivery FROM inbound WHERE account = ? "
                      "AND user = ? AND kind NOT LIKE 'event%' ORDER BY received_at DESC, id DESC LIMIT ?",
                      [account, user, limit]).fetchall()
    return [{"at": at, "kind": kind, "question": content, "answer": answer, "delivery": delivery}
            for at, kind, content, answer, delivery in reversed(rows)]
