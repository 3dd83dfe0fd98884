"""Whether the registry can hold a champion at all, answered without importing MLflow or
PyTorch (seconds of CPU): a monitor-consumer with nothing to score stays light.

Only a local SQLite store can be asked this cheaply (MLflow's own table of aliases); for any
other store the answer is "maybe", and the caller loads the registry to find out.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

MODEL_NAME = "expected-usage"
CHAMPION_ALIAS = "champion"


def champion_may_exist(tracking_uri: str) -> bool:
    """False only when certain that no ``champion`` of :data:`MODEL_NAME` is registered."""
    if not tracking_uri.startswith("sqlite:"):
        return True
    database = make_url(tracking_uri).database
    if not database or database == ":memory:":
        return True
    if not Path(database).expanduser().exists():
        return False  # nothing was ever registered there
    engine = create_engine(tracking_uri)
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM registered_model_aliases WHERE name = :name AND alias = :alias"),
                                 {"name": MODEL_NAME, "alias": CHAMPION_ALIAS}).first()
        return found is not None
    except SQLAlchemyError:
        return True  # not a store this probe understands: let MLflow answer
    finally:
        engine.dispose()
