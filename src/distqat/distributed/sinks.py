"""Where the monitor's view of the swarm goes: `metrics.jsonl` in the log dir, and W&B when asked for
(TensorBoard: `distqat.observability.tensorboard`).

W&B is optional: no `wandb_project`, no wandb package, or no login turn it off with one log line, never
an error. `WANDB_MODE=offline` works with no login.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from distqat.observability.scalars import fleet_scalars

logger = logging.getLogger(__name__)


class JsonlSink:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbSink:
    def __init__(self, run: Any):
        self._run = run

    @classmethod
    def open(cls, project: str | None, entity: str | None, name: str, config: dict[str, Any]) -> WandbSink | None:
        if not project:
            return None
        try:
            import wandb
        except ImportError:
            logger.info("W&B off: the wandb package is not installed (pip install 'distqat[wandb]')")
            return None
        offline = os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}
        if not offline and not (os.environ.get("WANDB_API_KEY") or _has_netrc_login()):
            logger.info("W&B off: no login (run `wandb login`, or set WANDB_MODE=offline to log locally)")
            return None
        try:
            run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                config=config,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60, console="off"),
            )
        except Exception as error:  # wandb raises many types (auth, network, usage); none should stop training
            logger.warning("W&B off: wandb.init failed: %s", str(error).splitlines()[0] if str(error) else error)
            return None
        logger.info("W&B run %s (%s mode)", run.name, "offline" if offline else "online")
        return cls(run)

    def log(self, row: dict[str, Any]) -> None:
        # Flat, named scalars (loss per trainer and overall, samples/s, live replicas per stage, bytes):
        # W&B charts numbers, and would otherwise store the nested fleet tables as opaque dicts.
        self._run.log(fleet_scalars(row))

    def close(self) -> None:
        import wandb

        self._run.finish()
        wandb.teardown()  # stops wandb's service process now rather than when this process exits


def _has_netrc_login() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
