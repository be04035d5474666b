"""Status conditions of a MailRelay (Ready, Scaling, Overloaded, Draining), in metav1.Condition form, and
when a new status is worth a patch.

`set_condition` returns a new list with one condition set. Its `lastTransitionTime` changes only when
the status changes, so that `kubectl describe` shows since when a state holds. `patch_due` says whether a
status must be written now. Pure: no I/O and no clock reads (the caller passes the time); it never
mutates its input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from mailrelay_operator import kubetypes

READY = "Ready"
SCALING = "Scaling"
OVERLOADED = "Overloaded"
DRAINING = "Draining"
TYPES = (READY, SCALING, OVERLOADED, DRAINING)

Status = Literal["True", "False", "Unknown"]
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
MAX_MESSAGE = 32768


# Status fields that follow the traffic and move on almost every tick. Written at most every
# `--status-refresh-seconds` when nothing else changed: each status patch is a write to etcd and a watch
# event for every client of MailRelays (Kopf included), and Prometheus has the live figures.
VOLATILE_FIELDS = frozenset({"sessions", "queueMessages"})


def patch_due(current: Mapping[str, object], wanted: Mapping[str, object], *, last_patch: float | None,
              now: float, refresh_seconds: float) -> bool:
    """Whether the status `wanted` must be written over `current` now.

    Any change of a field outside VOLATILE_FIELDS (counts of relays, conditions, the stabilization
    window, observedGeneration, ...) is written at once; a change of volatile fields only is written when
    `refresh_seconds` have passed since the last patch (`last_patch`, None: none made by this process)."""
    changed = {key for key, value in wanted.items() if current.get(key) != value}
    if not changed:
        return False
    if not changed <= VOLATILE_FIELDS:
        return True
    return last_patch is None or now - last_patch >= refresh_seconds


def get_condition(existing: Sequence[kubetypes.Condition], type_: str) -> kubetypes.Condition | None:
    for cond in existing:
        if cond.get("type") == type_:
            return cond
    return None


def status_of(flag: bool) -> Status:
    return "True" if flag else "False"


def set_condition(
    existing: Sequence[kubetypes.Condition],
    type_: str,
    status: Status,
    reason: str,
    message: str,
    now_iso: str,
    observed_generation: int | None = None,
) -> list[kubetypes.Condition]:
    """A copy of `existing` with condition `type_` set; other conditions keep their order and content.

    lastTransitionTime becomes `now_iso` when the condition is new or its status changed, and is kept
    otherwise (even when reason or message change). The reason must be CamelCase, as the API requires.
    """
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    if not _REASON.match(reason) or len(reason) > 1024:
        raise ValueError(f"condition reason must be CamelCase, got {reason!r}")
    previous = get_condition(existing, type_)
    transition = now_iso
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    new: kubetypes.Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    result: list[kubetypes.Condition] = []
    replaced = False
    for cond in existing:
        if cond.get("type") == type_:
            if not replaced:
                result.append(new)
                replaced = True
            continue
        result.append(cond.copy())
    if not replaced:
        result.append(new)
    return result
