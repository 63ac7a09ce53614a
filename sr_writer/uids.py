"""Deterministic UIDs for the report objects.

A retried job must re-create the same SR (same Series and SOP Instance UIDs), so every UID
is derived from the job key: ``2.25.<uuid5(namespace, job_key + "|" + role) as integer>``
(PS3.5 B.2, UUID-derived UIDs).
"""

from __future__ import annotations

import uuid
from typing import Final

#: Namespace of all qcnode UIDs (uuid5 of the project URL in the URL namespace).
NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://qcnode.invalid/uid")


def derive_uid(job_key: str, role: str) -> str:
    """A ``2.25.`` UID that depends only on ``job_key`` and ``role``.

    Parameters
    ----------
    job_key
        The job's idempotency key (series UID + engine + model revision).
    role
        What the UID names, e.g. ``"sr-series"`` or ``"sr-instance"``.
    """
    if not job_key:
        raise ValueError("job_key must not be empty")
    return f"2.25.{uuid.uuid5(NAMESPACE, f'{job_key}|{role}').int}"
