"""Which configuration file applies (no pydantic here: the light commands ask this first)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = Path("~/.config/tunerd/tunerd.toml")


def config_path(explicit: str | None) -> tuple[Path | None, bool]:
    """The file to read, and whether it was named (``--config``/``$TUNERD_CONFIG``: must exist).

    Unnamed, it is ``~/.config/tunerd/tunerd.toml`` when that exists, else none (built-in defaults).
    """
    if explicit:
        return Path(explicit).expanduser(), True
    if env := os.environ.get("TUNERD_CONFIG"):
        return Path(env).expanduser(), True
    default = DEFAULT_CONFIG.expanduser()
    return (default if default.exists() else None), False


def is_configured(explicit: str | None) -> bool:
    """Whether anything beyond the built-in defaults is set (a file or a TUNERD_* variable)."""
    path, _ = config_path(explicit)
    return path is not None or any(k.startswith("TUNERD_") for k in os.environ)
