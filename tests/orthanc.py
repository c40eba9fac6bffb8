"""A throw-away Orthanc (Debian package ``orthanc``) for tests: temporary storage, loopback ports,
no plugins, no authentication (REST answers local requests only); stopped and removed on exit."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """``with Orthanc(dicom_port) as pacs: pacs.get("/instances")``."""

    def __init__(self, dicom_port: int | None = None, ae_title: str = "ORTHANC"):
        self.folder = Path(tempfile.mkdtemp(prefix="dlad-orthanc-"))
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.ae_title = ae_title
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        config = {
            "Name": "dlad-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.ae_title, "Plugins": [],
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "StableAge": 1,
            "HttpDescribeErrors": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/system")
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("Orthanc did not start: " +
                                       (self.folder / "orthanc.log").read_text()[-2000:]) from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self.get_bytes(path))
