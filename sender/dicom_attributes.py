"""The DICOM attributes a stream carries (the header's ``dicom`` map) and their de-identification.

A receiver that files the study in a PACS or shows it in a DICOM viewer needs the identity of
the series (study and series UIDs, frame of reference), who and what it is (patient and study
identifiers and descriptions, series number and description, acquisition date and time,
modality, equipment) and how it was acquired (orientation, pixel spacing, slice thickness,
rescale, window). :data:`STREAM_KEYWORDS` lists them; :func:`stream_attributes` takes them from
the series' first slice (in slice order) and adds ``SpacingBetweenSlices`` from the volume's
geometry. Per-slice values (``ImagePositionPatient``) are those of slice 0: the header's affine
gives every other slice's position.

De-identification (``dlad-send --deidentify``), :class:`Deidentifier`: identifying attributes are
replaced by **stable pseudonyms**, keyed hashes of the original value with a site secret (HMAC-
SHA-256, key of 32 random bytes made once and kept in the spool, mode 0600, or given with
``--deidentify-key``). The same patient, study or series always gets the same pseudonym at one
site (a control scan lands beside its planning scan; a sender restarted keeps them), and nobody
without the key can recompute or reverse them (unlike a plain hash of a patient id, which can be
brute-forced over the id space).

=====================================  =========================================================
attribute                              with ``--deidentify``
=====================================  =========================================================
``PatientID``                          ``DLAD-`` + 12 hex digits of HMAC(key, patient)
``PatientName``                        ``ANON^`` + the same 12 hex digits
``StudyInstanceUID``, ``SeriesInstanceUID``,  ``2.25.`` + the first 128 bits of HMAC(key, UID) as
``FrameOfReferenceUID``                a decimal integer (a UUID-derived UID, PS3.5 B.2):
                                       every UID maps to one new UID, consistently
``AccessionNumber``                    ``A`` + 12 hex digits of HMAC(key, value)
``StudyID``                            ``S`` + 8 hex digits of HMAC(key, value)
``PatientBirthDate``, ``ReferringPhysicianName``, ``InstitutionName``, ``StationName``,
``OperatorsName``, ``PerformingPhysicianName``, ``DeviceSerialNumber``: left out
=====================================  =========================================================

"patient" is the PatientID (the PatientName when there is none). Kept as they are: dates and times
(a live consult happens today; PS3.15's "retain longitudinal temporal information" option),
``PatientSex`` and ``PatientAge`` (clinically relevant, not identifying on their own), the
descriptions (``StudyDescription``, ``SeriesDescription``, ``ProtocolName``: they say what the
series is; a site that types names into them must not use them as free text), and all technical
attributes. Nothing else of the source reaches the stream: the study id and provenance are made
from the pseudonyms, never from file names or AE titles.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

#: The attributes carried in the header's ``dicom`` map, by keyword.
STREAM_KEYWORDS = (
    # patient
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    # study
    "StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate", "StudyTime",
    "StudyDescription", "ReferringPhysicianName",
    # series
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "Modality", "BodyPartExamined", "ProtocolName", "PatientPosition", "SOPClassUID",
    # acquisition
    "AcquisitionNumber", "AcquisitionDate", "AcquisitionTime", "ContrastBolusAgent", "KVP",
    "ConvolutionKernel",
    # equipment
    "Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName",
    # geometry (ImagePositionPatient: of slice 0)
    "FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
    "SliceThickness",
    # pixels
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
)

#: Identifying attributes left out of the stream with ``--deidentify``.
REMOVED = ("PatientBirthDate", "ReferringPhysicianName", "InstitutionName", "StationName",
           "OperatorsName", "PerformingPhysicianName", "DeviceSerialNumber")
#: UIDs remapped consistently with ``--deidentify``.
REMAPPED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
KEY_BYTES = 32


class Deidentifier:
    """Stable pseudonyms for identifying DICOM attributes (see the module docstring).

    Args:
        key: the site secret (at least 16 bytes).

    >>> d = Deidentifier(b"k" * 32)
    >>> out = d.attributes({"PatientID": "12345", "PatientName": "DOE^JANE",
    ...                     "StudyInstanceUID": "1.2.3", "PatientBirthDate": "19700101",
    ...                     "SeriesNumber": 3})
    >>> out["PatientID"], out["PatientName"], "PatientBirthDate" in out, out["SeriesNumber"]
    ('DLAD-7FE48293398D', 'ANON^7FE48293398D', False, 3)
    >>> out["StudyInstanceUID"] == d.uid("1.2.3") != "1.2.3"
    True
    """

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the de-identification key must have at least 16 bytes")
        self._key = bytes(key)

    @classmethod
    def from_key_file(cls, path: Path, create: bool = False) -> Deidentifier:
        """The key of ``path`` (hex or raw bytes); with ``create``, made there if missing."""
        path = Path(path)
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read the de-identification key {path}: "
                             f"{error.strerror or error}") from None
        text = raw.strip()
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = raw
        return cls(key)

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The pseudonym UID of ``uid``: ``2.25.<128-bit integer>`` (at most 44 characters)."""
        return "2.25." + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))

    def attributes(self, attributes: dict) -> dict:
        """A copy of a ``dicom`` map with the identifying attributes replaced or left out."""
        out = {k: v for k, v in attributes.items() if k not in REMOVED}
        patient = str(attributes.get("PatientID") or attributes.get("PatientName") or "")
        if patient or "PatientID" in attributes or "PatientName" in attributes:
            code = self._digest("patient", patient).hex()[:12].upper()
            out["PatientID"] = f"DLAD-{code}"
            out["PatientName"] = f"ANON^{code}"
        for keyword in REMAPPED_UIDS:
            if attributes.get(keyword):
                out[keyword] = self.uid(str(attributes[keyword]))
        if attributes.get("AccessionNumber"):
            out["AccessionNumber"] = "A" + self._digest(
                "accession", str(attributes["AccessionNumber"])).hex()[:12].upper()
        if attributes.get("StudyID"):
            out["StudyID"] = "S" + self._digest("study-id", str(attributes["StudyID"])).hex()[
                :8].upper()
        return out


def stream_attributes(series, deidentifier: Deidentifier | None = None) -> dict:
    """The header ``dicom`` map of a :class:`sender.dicom.DicomSeries` (de-identified if asked).

    Values are strings, numbers or lists of them; empty attributes are left out.
    """
    attributes = series.attributes(STREAM_KEYWORDS)
    attributes["SpacingBetweenSlices"] = round(float(series.volume.spacing[2]), 6)
    attributes.setdefault("Modality", series.volume.extra.get("modality") or "CT")
    return deidentifier.attributes(attributes) if deidentifier is not None else attributes
