"""Packaging: the license, one version everywhere, and pins that match what the code supports."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from shared.version import __version__, client_string

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_license_file_is_the_apache_license_the_metadata_declares():
    text = (ROOT / "LICENSE").read_text()
    assert project()["license"] == {"text": "Apache-2.0"}
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, "
                                    "January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The dlad-stream authors" in text and "[yyyy]" not in text


def test_one_version_from_pyproject_to_every_command_line():
    assert __version__ == version("dlad-stream") == project()["version"]
    assert client_string("dlad-send") == f"dlad-send/{__version__}"
    for module, program in (("sender.cli", "dlad-send"), ("receiver.cli", "dlad-receive"),
                            ("shared.link.cli", "dlad-link")):
        result = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout) == (0, f"{program} {__version__}\n")
    result = subprocess.run([sys.executable, "-m", "shared.link.cli", "demo", "--version"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout == f"dlad-link {__version__}\n"


def test_no_version_is_written_by_hand_in_the_code():
    pattern = re.compile(r"dlad-(send|receive|link)/\d")
    for path in [*ROOT.glob("sender/**/*.py"), *ROOT.glob("receiver/**/*.py"),
                 *ROOT.glob("shared/**/*.py")]:
        text = path.read_text()
        # Docstrings may show an example of the client string; code must not build one.
        code = re.sub(r'"""(.|\n)*?"""', "", text)
        assert not pattern.search(code), path


def test_the_aiortc_pin_is_the_series_the_sctp_tuning_supports():
    from aiortc import __version__ as installed

    from shared.webrtc.sctp import SUPPORTED_AIORTC

    (pin,) = [r for r in project()["dependencies"] if r.startswith("aiortc")]
    low, high = re.fullmatch(r"aiortc>=(\d+\.\d+),<(\d+\.\d+)", pin).groups()
    assert SUPPORTED_AIORTC == (f"{low}.",)  # one series: >=1.16,<1.17 is exactly "1.16."
    major, minor = (int(v) for v in low.split("."))
    assert high == f"{major}.{minor + 1}"
    assert installed.startswith(SUPPORTED_AIORTC)


def test_what_the_readme_makes_users_create_is_ignored_and_no_repo_file_is():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    created = ["recon.nii.gz", "demo.nii.gz", "demo.nii", "study.dlad", "status.json",
               "token.txt", "token-receiver.txt", "received/ct-1a2b/volume.nii",
               "received/ct-1a2b/status.json", "sub/dir/ct.nii.gz"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *created], cwd=ROOT,
                            capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(created)
    hidden = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert hidden.stdout == ""  # no file of the repository matches an ignore pattern
