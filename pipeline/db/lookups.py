"""Name-to-id lookup tables (tasks, resources), safe when two writers add one name at once."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.dialects import postgresql, sqlite


class NameLookup:
    """Caches ``name -> id`` for one lookup table, inserting names it has not seen.

    The insert is ``ON CONFLICT DO NOTHING`` followed by a select, so two consumers adding the
    same new name concurrently both end up with the one id the database kept.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        self._ids: dict[str, int] = {}

    def id_of(self, conn: Connection, name: str) -> int:
        """The id of ``name``, creating the row when it is new."""
        cached = self._ids.get(name)
        if cached is not None:
            return cached
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        conn.execute(dialect.insert(self.table).values(name=name).on_conflict_do_nothing(
            index_elements=["name"]))
        row_id = conn.execute(select(self.table.c.id).where(self.table.c.name == name)).scalar_one()
        self._ids[name] = row_id
        return row_id

    def committed_id_of(self, engine: Engine, name: str) -> int:
        """The id of ``name``, resolved in a transaction of its own that commits before the
        id is cached: for writers whose threads share this lookup, since an id cached before
        its row commits is invisible to another thread's foreign key check."""
        cached = self._ids.get(name)
        if cached is not None:
            return cached
        resolver = NameLookup(self.table)
        with engine.begin() as conn:
            row_id = resolver.id_of(conn, name)
        self._ids[name] = row_id
        return row_id

    def name_of(self, conn: Connection, row_id: int) -> str:
        """The name stored under ``row_id``."""
        for name, cached in self._ids.items():
            if cached == row_id:
                return name
        name = conn.execute(select(self.table.c.name).where(self.table.c.id == row_id)).scalar_one()
        self._ids[name] = row_id
        return name
