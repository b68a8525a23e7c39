"""Network probes and offline advice: say at once that a server cannot be reached, instead of letting a library
retry for minutes inside a stage. No torch here."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the server at ``url`` cannot be reached within ``timeout`` seconds; None when a TCP connection opens.

    Run in a thread because name resolution has no timeout of its own."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


HUB_URL = "https://huggingface.co"


def offline_advice(name: str, what: str = "model") -> str:
    if what == "model":
        return (
            f"To run offline: set model.name_or_path to a local directory, or download it once where there is a "
            f"network (huggingface-cli download {name}) and run with HF_HUB_OFFLINE=1 to use the cache"
        )
    return (
        "To run offline: download the data and use 'path:' in the recipe, or load it once where there is a network "
        "and run with HF_HUB_OFFLINE=1 to use the datasets cache"
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
