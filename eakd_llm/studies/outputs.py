"""What a study writes for others to read: results that name no folder of the machine that made them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def relative_paths(value: Any, root: Path) -> Any:
    """``value`` with every string naming a path inside ``root`` made relative to it (results that name no folder of
    the machine that ran them)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    if isinstance(value, str):
        return value[len(prefix):] if value.startswith(prefix) else "." if value == str(root) else value
    if isinstance(value, dict):
        return {k: relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, root) for v in value]
    return value
