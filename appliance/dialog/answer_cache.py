"""The answer cache, for "local cache mode": questions an operator marked as frequently asked, with the answers
they approved, given at once when no model backend can answer (the model process down, the network to HQ cut).

A user's question matches an entry when their normalized texts (NFKC, lower case, without spaces and punctuation)
are equal, or share enough character pairs: Jaccard similarity of the bigram sets at least `min_similarity`
(0.6 by default). Chinese questions vary in particles and word order more than in their content words, and the
pairs catch that without a tokenizer; a stricter threshold gives fewer, surer matches. Entries are written by
people, not by users: the table is plain, and every change is an audit row (the admin pages' /answers, appliance/admin/pages.py).
"""

from __future__ import annotations

import time
import unicodedata


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PSZC")


def _pairs(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1)} or {text}


def similarity(a: str, b: str) -> float:
    """Of two normalized texts: 1.0 when equal, else the Jaccard similarity of their character pairs."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    x, y = _pairs(a), _pairs(b)
    return len(x & y) / len(x | y)


# ---- store functions, run on the store's thread ----

def lookup(db, account: str, question: str, min_similarity: float) -> str | None:
    """The approved answer of the entry (this account's or every account's) closest to the question."""
    asked = normalize(question)
    best, answer = min_similarity, None
    for normalized, approved in db.execute("SELECT normalized, answer FROM answer_cache WHERE account IN ('', ?) "
                                           "ORDER BY account DESC, id", [account]):
        score = similarity(asked, normalized)
        if score >= best and (answer is None or score > best):
            best, answer = score, approved
    return answer


def entries(db) -> list[dict]:
    return [dict(zip(("id", "account", "question", "answer", "created_by", "updated_at"), row)) for row in
            db.execute("SELECT id, account, question, answer, created_by, updated_at FROM answer_cache ORDER BY id")]


def add(db, account: str, question: str, answer: str, actor: str) -> int:
    now = time.time()
    row = db.execute("INSERT INTO answer_cache (account, question, normalized, answer, created_by, created_at, "
                     "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [account, question, normalize(question), answer, actor, now, now]).lastrowid
    db.conn.commit()
    return row


def remove(db, entry: int) -> bool:
    gone = db.execute("DELETE FROM answer_cache WHERE id = ?", [entry]).rowcount == 1
    db.conn.commit()
    return gone
