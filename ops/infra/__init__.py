"""Local infrastructure for development and CI: a single-node Kafka 4.x and a PostgreSQL 15.

``python -m pipeline infra up [--postgres] | status | down``. What ``up`` starts is recorded
under the state directory; ``down`` stops exactly that.
"""
