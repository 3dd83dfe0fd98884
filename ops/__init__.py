"""Operator tools: the local infrastructure (a single-node Kafka, PostgreSQL, the shared
monitoring services) and deployment to a Kubernetes cluster.

Its command line is ``python -m pipeline`` (``infra up|status|down|rotate-password``,
``settings``, ``deploy``); ``python -m ops`` is the same. The orchestrator uses :mod:`ops.infra`
to start a local broker when none is configured; no service in a cluster needs this package.
"""
