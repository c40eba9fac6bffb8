"""Packaging: the license, one version everywhere, pins that match what the code supports, and
what the tests import is what the README's test command installs.

The README's second line (and ``.ci/run``) installs the project with the extras
``sender,test,dicom,lint``; a package that a test imports itself must be declared there, not
arrive by chance as another package's dependency (Pillow came only through highdicom).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest

from shared.version import __version__, client_string

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"sender", "receiver", "shared", "models", "scripts", "tests"}


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


def readme_extras() -> list[str]:
    """The extras of the README's test command (its second line)."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "pytest" in line)
    return re.search(r'"\.\[([a-z,]+)\]"', command).group(1).split(",")


def declared(extras: list[str]) -> set[str]:
    """Normalised distribution names of the base dependencies and of ``extras``."""
    metadata = project()
    requirements = list(metadata["dependencies"])
    for extra in extras:
        requirements += metadata["optional-dependencies"][extra]
    return {normalise(re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0])
            for requirement in requirements}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_by_tests() -> dict[str, str]:
    """Top-level modules the test files import, each with one file that imports it."""
    local = {path.stem for path in (ROOT / "tests").glob("*.py")}
    found = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY | local:
                    found.setdefault(top, path.name)
    return found


def test_the_readme_test_command_installs_what_ci_installs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'-e ".[{",".join(readme_extras())}]"' in ci


def test_every_package_a_test_imports_is_declared():
    extras = readme_extras()
    names = declared(extras)
    distributions = packages_distributions()
    undeclared = {}
    for module, where in imported_by_tests().items():
        provided_by = {normalise(d) for d in distributions.get(module, [module])}
        if not provided_by & names:
            undeclared[module] = where
    assert not undeclared, (f"imported by tests but not declared in the dependencies or the "
                            f"extras {extras} of pyproject.toml: {undeclared}")
