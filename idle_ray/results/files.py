"""Result files on the local disk: JSON, Markdown and PNG, always written to a temp path and renamed."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` for a temp file beside ``path``, then rename it into place (readers
    never see a half-written file); the temp file is removed on any error."""
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


def json_text(obj) -> str:
    """The JSON form of every result file (indented; non-JSON values as their ``str``)."""
    return json.dumps(obj, indent=2, default=str)


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda t: Path(t).write_text(json_text(obj)))


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda t: Path(t).write_text(text))
