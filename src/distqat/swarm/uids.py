"""Expert uids, in the documented form `{stage}.0.{expert_index}.0` (e.g. `head.0.3.0`)."""

from __future__ import annotations

import re

from distqat.errors import SwarmError

_UID = re.compile(r"(?P<stage>[A-Za-z0-9_\-]+)\.0\.(?P<index>\d+)\.0")


def make_uid(stage: str, expert_index: int) -> str:
    if expert_index < 0:
        raise SwarmError(f"expert index must be >= 0, got {expert_index}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", stage):
        raise SwarmError(f"stage name '{stage}' may only hold letters, digits, '_' and '-'")
    return f"{stage}.0.{expert_index}.0"


def parse_uid(uid: str) -> tuple[str, int]:
    """Return (stage, expert_index) of a uid, or raise SwarmError naming the malformed uid."""
    match = _UID.fullmatch(uid)
    if match is None:
        raise SwarmError(f"malformed expert uid '{uid}': expected '<stage>.0.<expert_index>.0'")
    return match["stage"], int(match["index"])
