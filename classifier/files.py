"""Writing files so that a crash never leaves a half-written one: atomic_write and write_text.

Every file the project writes (checkpoints, safetensors, reports, plots, caches) goes through here. A
leaf module: it imports nothing from the project, so the data path and the plots can use it without
pulling in checkpoints or models.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The process umask, read once (os.umask can only be read by setting it): atomic_write gives its files
# the permissions open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """Call write(tmp_path), fsync, then rename over `path`. A crash at any moment leaves either the old
    file or the new one, never a half-written file under the real name. With `keep_previous`, the old
    file is first moved there, so one older good copy always survives a later corruption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600, and some writers (safetensors' save_file) make their own file 0600 too:
        # give the written file the permissions open() would, so another user or service can read it.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(
            err.errno, f"could not write {path} ({err.strerror or err}); the previous file is intact"
        ) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
