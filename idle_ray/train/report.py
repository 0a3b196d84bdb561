"""Result files: JSON / Markdown / PNG, always written to a temp path and renamed."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _atomic_write(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj) -> Path:
    return _atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2, default=str)))


def write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda t: Path(t).write_text(text))
