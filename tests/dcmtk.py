"""dcmtk's command-line tools, not pynetdicom's console scripts of the same names.

pynetdicom installs ``storescu`` and ``echoscu`` scripts in the environment's ``bin`` folder,
which comes first on ``PATH`` in an activated virtual environment (as in ``.ci/run``); they take
other options than dcmtk's (no ``-xv``, say). dcmtk's are native programs, not scripts.
"""

from __future__ import annotations

import os
from pathlib import Path


def dcmtk_tool(name: str) -> str | None:
    """The path of dcmtk's ``name`` on ``PATH`` (the first native program of that name)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with open(candidate, "rb") as handle:
            if handle.read(2) != b"#!":  # a script (pynetdicom's), not dcmtk's program
                return str(candidate)
    return None
