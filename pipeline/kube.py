"""What the code that talks to the Kubernetes API shares (deploy, the runtime, submit)."""

from __future__ import annotations

import json


def api_message(exc) -> str:
    """The API server's own words in a client ``ApiException`` (the ``message`` of its Status
    body), else the HTTP reason."""
    try:
        body = json.loads(exc.body)
        return str(body.get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", "") or exc)
