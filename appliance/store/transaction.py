"""One transaction around several statements: all of them or none.

sqlite-utils commits each write statement on its own unless a transaction is open, and `with conn:` opens none, so
an act of several statements (a purge and its audit row, a row and its sealed values) begins one explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transaction(db, immediate: bool = False) -> Iterator[None]:
    """IMMEDIATE takes the write lock at once, so that what is read inside is what is written back."""
    db.conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:  # a full disk may already have rolled it back
            db.conn.rollback()
        raise
    db.conn.commit()
