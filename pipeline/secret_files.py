"""Files that hold a secret (a password, a token, a key), private from their first byte.

``Path.write_text`` creates a file with the umask's permissions (usually 0644) and a later
``chmod`` comes too late: another user can open the file in between and keep reading it. Here
the file is created 0600 by the ``open`` call itself, exclusively (a file or symlink planted
under the temporary name is refused, never followed), filled, and renamed into place, so no
version of the path is ever readable by anyone but its owner. A folder for secrets is made
0700 before anything goes into it.

Named ``secret_files``, not ``secrets``: a module called ``secrets`` would shadow the
standard library's for any script run from this folder.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) with the folder itself 0700; an existing folder
    is locked down to 0700 too. Returns it as a Path."""
    folder = Path(path)
    folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is cut by the umask; an old folder kept its own
    return folder


def write_secret(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write ``content`` to ``path`` as a 0600 file, replacing any file there atomically.

    The bytes go into a new file next to it, created 0600 with ``O_EXCL | O_NOFOLLOW``, then
    renamed over ``path``: the permissions hold from the first byte whatever the umask, and a
    reader sees the old file or the whole new one. Returns ``path`` as a Path.
    """
    target = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 SECRET_FILE_MODE)
    try:
        try:
            os.fchmod(fd, SECRET_FILE_MODE)  # exactly 0600, even under a umask that took more away
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target
