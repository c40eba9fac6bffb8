"""What every dlad-stream command line shares: an argument parser whose errors are one line."""

from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: ...``), exiting with
    status 2: the usage block argparse prints first would bury the reason in a log."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")
