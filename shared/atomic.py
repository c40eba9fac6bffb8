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
# give it, so a viewer running as another user can read a received volume.
_UMASK = os.umask(0)
os.umask(_UMASK)


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
