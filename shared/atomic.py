"""Atomic file replacement: write under a temporary name beside the target, then rename.

A reader (a viewer polling a snapshot, a resumed receiver, a user) never sees a half-written
file, and a failure leaves the previous file, or nothing, in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates owner-only files; a finished file gets the permissions a plain open() would
# give it (0666 less the umask). The umask is read once here (reading it means setting it,
# which is not thread-safe) and changed only through set_umask.
_UMASK = os.umask(0)
os.umask(_UMASK)


def set_umask(mask: int) -> int:
    """Set the process umask (and the one atomic writes follow); return the previous one.

    ``dlad-receive`` sets 0o077 (files 0600, folders 0700: received studies are patient data)
    unless ``--umask`` says otherwise. Call it at start-up, before threads write files.
    """
    global _UMASK
    if not 0 <= mask <= 0o777:
        raise ValueError(f"a umask is between 000 and 777 (octal), got {mask:o}")
    previous = os.umask(mask)
    _UMASK = mask
    return previous


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps an extension that a writer looks at (``.nii.gz`` for nibabel).

    Example:
        >>> with atomic_path("/tmp/example.json") as temporary:   # doctest: +SKIP
        ...     temporary.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path, value) -> None:
    """Write ``value`` as indented JSON under a temporary name and rename it onto ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1))
