"""Re-sealing rows under the newest key: `r1box keys rotate`, and rows written before encryption (key_id NULL).

It runs beside a live service. Each batch is one short write transaction begun IMMEDIATE, so the rows it read are
the rows it writes (an answer the service stores meanwhile waits, then lands on the re-sealed row, never under a
stale copy) and the service waits out the lock within its busy_timeout. A value names the key that sealed it, so
rows not re-sealed yet stay readable all along; a row that cannot be opened is counted and left as it is.
"""

from __future__ import annotations

import logging

from appliance.errors import UnreadableValue
from appliance.store import audit
from appliance.store.transaction import transaction
from appliance.store.vault import Vault, record_keys

log = logging.getLogger(__name__)

# table: (the column that names a row in its values' associated data, the sealed columns)
SEALED = {
    "inbound": ("dedup_key", ("content", "answer", "user_sealed")),
    "turns": ("id", ("content",)),
    "outbox": ("id", ("content", "user_sealed")),
    "release_samples": ("id", ("answer",)),  # shadow answers (appliance/release/); always sealed when written
}
BATCH = 200


def rotate(db, vault: Vault, actor: str, batch: int = BATCH) -> dict:
    """Add a key, record its check value, re-seal every row under it; one audit row with the counts."""
    new = vault.keyring.add_key()
    record_keys(db, vault)
    counts = _reseal_all(db, vault, "key_id IS NULL OR key_id < ?", [new], batch)
    with transaction(db):
        audit.record(db, "keys_rotate", {"key_id": new, **counts}, actor)
    return {"key_id": new, **counts}


def seal_plaintext_rows(db, vault: Vault) -> dict:
    """Rows from before encryption: users hashed, contents and OpenIDs sealed. Audited when there were any."""
    counts = _reseal_all(db, vault, "key_id IS NULL", [], BATCH)
    if any(counts.values()):
        with transaction(db):
            audit.record(db, "seal_plaintext_rows", counts, "system")
        log.info("sealed rows written before encryption", extra=counts)
    return counts


def _reseal_all(db, vault: Vault, where: str, params: list, batch: int) -> dict:
    counts = {"resealed": 0, "unreadable": 0}
    for table in SEALED:
        after = 0
        while True:
            with transaction(db, immediate=True):
                rows = list(_rows(db, table, where, params, after, batch))
                for row in rows:
                    try:
                        update = _resealed(vault, table, row)
                    except UnreadableValue as e:
                        counts["unreadable"] += 1
                        log.error("cannot re-seal: %s", e)
                        continue
                    assignments = ", ".join(f"{column} = ?" for column in update)
                    db.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", [*update.values(), row["id"]])
                    counts["resealed"] += 1
            if len(rows) < batch:
                break
            after = rows[-1]["id"]
    return counts


def _rows(db, table: str, where: str, params: list, after: int, batch: int):
    cursor = db.execute(f"SELECT * FROM {table} WHERE ({where}) AND id > ? ORDER BY id LIMIT ?",
                        [*params, after, batch])
    names = [d[0] for d in cursor.description]
    return (dict(zip(names, r)) for r in cursor.fetchall())


def _resealed(vault: Vault, table: str, row: dict) -> dict:
    """The new values of one row's sealed columns (and, for a plaintext row, its hashed user and key)."""
    ref_column, columns = SEALED[table]
    update: dict = {}
    if row["key_id"] is None:  # plaintext from before encryption
        values = {c: row["user"] if c == "user_sealed" else row[c] for c in columns}
        update["user"] = vault.user_hash(row["account"], row["user"])
        if table == "inbound":
            update["dedup_key"] = vault.ref(row["dedup_key"])
        if table == "outbox" and row["inbound_key"]:
            update["inbound_key"] = vault.ref(row["inbound_key"])
        ref = update.get(ref_column, row[ref_column])
    else:
        ref = row[ref_column]
        values = {c: vault.unseal(row[c], table, c, ref) for c in columns}
    update.update({c: vault.seal(v, table, c, ref) for c, v in values.items()})
    update["key_id"] = vault.current
    return update
