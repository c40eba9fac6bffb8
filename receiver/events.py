"""How features built on the receiver hear about studies and serve their own pages.

A listener (the web viewer, DICOM export, a PACS push...) registers with
:meth:`ReceiverService.add_listener <receiver.service.ReceiverService.add_listener>` before the
service starts. It is an object with three methods (duck-typed, see :class:`StudyListener`):

* ``attach(service)``: called once at registration. It may add HTTP routes to ``service.app``
  (they are served on the receiver's own listener, so they get its TLS, its connection cap and
  its timeouts), directly or with :meth:`~receiver.service.ReceiverService.add_route`, which
  also puts the senders' bearer-token check in front of the handler when asked.
* ``study_updated(runtime, update)``: called on the event loop when a study is loaded, after
  every batch of chunks it applies (``changed`` slice ranges, milestones ``reached``), when a
  snapshot was written, at the end of a pass or session (``ended``) and before it is dropped
  from memory (``unloaded``). It must not block: start a task or hand work to a thread for
  anything slow (``runtime.call(function)`` runs ``function()`` on the study's worker, in order
  with the chunks, where the volume may be read safely).
* ``close()`` (async): called when the service stops, before the studies are unloaded.

A listener that raises is logged and the reception goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class StudyUpdate:
    """What a listener hears about a study, on the event loop."""

    changed: list = field(default_factory=list)
    """Slice ranges ``(z0, z1)`` whose voxels changed (chunks applied by this batch)."""
    reached: list = field(default_factory=list)
    """Milestones reached: ``first_chunk``, ``roi_complete``, ``base_complete``,
    ``exact_complete``, ``complete`` (see :data:`shared.webrtc.protocol.MILESTONE_TEXT`)."""
    ended: bool = False
    """The sender's pass ended (end frame applied) or its session left."""
    opened: bool = False
    """The study was just loaded into memory (new, or reloaded from its folder)."""
    snapshot: bool = False
    """A new NIfTI snapshot was written (``runtime.record.snapshot_path``)."""
    unloaded: bool = False
    """The study is about to leave memory (it stays on disk)."""


class StudyListener(Protocol):
    """The methods a listener provides (see the module docstring)."""

    def attach(self, service) -> None: ...

    def study_updated(self, runtime, update: StudyUpdate) -> None: ...

    async def close(self) -> None: ...
