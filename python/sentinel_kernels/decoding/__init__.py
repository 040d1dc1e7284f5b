"""Fast decoding: :func:`generate` (``sk.generate``), with a preallocated cache, a CUDA-graph
decode step, on-device sampling and optional speculative decoding.

* :mod:`.api`: :func:`generate`, the entry (argument checks, padding, loop choice);
* :mod:`.fast`: the plain decode loop; :mod:`.speculative`: the speculative one and its
  drafters (:class:`DraftSpec`);
* :mod:`.session`: the per-model sessions (caches, graphs) both loops reuse,
  :func:`clear_sessions`; :mod:`.sampling`: next-token selection on the device.
"""

from __future__ import annotations

from .api import generate
from .fast import STOP_CHECK_EVERY
from .sampling import filter_logits, sample_next
from .session import MAX_SESSIONS, clear_sessions
from .speculative import DraftSpec, parse_draft

__all__ = [
    "MAX_SESSIONS",
    "STOP_CHECK_EVERY",
    "DraftSpec",
    "clear_sessions",
    "filter_logits",
    "generate",
    "parse_draft",
    "sample_next",
]
