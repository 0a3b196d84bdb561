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



def write_json_in(folder: str, name: str, obj) -> str:
    """``folder/name`` for a local folder (atomic) or an ``s3://`` / ``gs://`` prefix (an object
    store's put is atomic itself)."""
    from idle_ray.train import storage
    if not storage.is_uri(folder):
        return str(write_json(os.path.join(folder, name), obj))
    fs, path = storage.resolve(storage.join(folder, name))
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=2, default=str).encode())
    return storage.join(folder, name)


def read_json_in(folder: str, name: str) -> dict | None:
    """``folder/name`` parsed, or None when it does not exist."""
    from idle_ray.train import storage
    location = storage.join(folder, name)
    return json.loads(storage.read_bytes(location)) if storage.exists(location) else None
