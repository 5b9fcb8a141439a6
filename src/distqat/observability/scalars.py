"""A monitor row as flat scalars, for sinks that chart numbers (W&B, TensorBoard).

Names group by slash so both tools put them in sections: `fleet/…` totals, `loss/<trainer>`,
`eval_loss/<trainer>`, `samples_per_s/<trainer>`, `replicas/<stage>`, `stage_samples_per_s/<stage>`,
`bytes/<kind>`, `diloco_round/<stage>`.
"""

from __future__ import annotations

import math
from typing import Any


def _put(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float) and math.isfinite(value):
        out[name] = float(value)


def fleet_scalars(row: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("steps", "samples", "loss", "samples_per_s", "pipelines", "servers"):
        _put(out, f"fleet/{key}", row.get(key))
    for trainer_id, trainer in sorted(row.get("trainers", {}).items()):
        _put(out, f"loss/{trainer_id}", trainer.get("loss"))
        _put(out, f"samples_per_s/{trainer_id}", trainer.get("samples_per_s"))
        _put(out, f"failures/{trainer_id}", trainer.get("failures"))
        if trainer.get("eval_step"):
            _put(out, f"eval_loss/{trainer_id}", trainer.get("eval_loss"))
            _put(out, f"eval_accuracy/{trainer_id}", trainer.get("eval_accuracy"))
    for stage, alive in sorted(row.get("replicas", {}).items()):
        _put(out, f"replicas/{stage}", alive)
    for stage in (row.get("fleet") or {}).get("stages", []):
        _put(out, f"stage_samples_per_s/{stage['name']}", stage["samples_per_s"])
    for kind in ("bytes_sent", "bytes_received", "bytes_activations", "bytes_averaging"):
        _put(out, f"bytes/{kind.removeprefix('bytes_')}", row.get(kind))
    for stage, rounds in sorted(row.get("diloco_rounds", {}).items()):
        _put(out, f"diloco_round/{stage}", rounds)
    return out
