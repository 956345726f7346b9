"""Files written so that a reader sees the old file or the new one, never half of one; with the
modes every other file gets (the umask's), and temporaries a rerun recognizes and removes."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process's umask (read by setting it, as POSIX has no getter; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file: tempfile's are 0600, which a server running as another
    user (a container) could not read."""
    return 0o666 & ~umask()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())


def remove_temporaries(root: Path, keep: tuple[str, ...] = ()) -> list[Path]:
    """Remove what a killed run left under `root`: every dot-named file or folder (write-then-rename
    temporaries are `.<name>.<random>`, a unit's folder `.tmp-<unit>`) but those matching `keep`
    (the stamps' folder, the lock). Returns what it removed."""
    removed = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if not name.startswith(".") or any(fnmatch.fnmatch(name, k) for k in keep):
                continue
            p = Path(dirpath) / name
            if name in dirnames:
                dirnames.remove(name)
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
