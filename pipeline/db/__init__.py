"""Storage: the schema of the README's storage section, idempotent batch writes, name lookups, orders."""

from pipeline.db.engine import connect, create_schema
from pipeline.db.lookups import NameLookup
from pipeline.db.measurements import MeasurementWriter

__all__ = ["MeasurementWriter", "NameLookup", "connect", "create_schema"]
