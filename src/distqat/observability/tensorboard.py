"""TensorBoard sink: the monitor's rows as scalar event files in `<log_dir>/tensorboard` (`monitor.tensorboard`).

Written with tensorboardX, a small library that needs only numpy and protobuf (the full `tensorboard`
package, which `torch.utils.tensorboard` needs, brings grpcio, werkzeug and a web server just to write
files). `tensorboard --logdir <log_dir>/tensorboard` reads them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distqat.observability.scalars import fleet_scalars

logger = logging.getLogger(__name__)


class TensorBoardSink:
    def __init__(self, writer: Any):
        self._writer = writer

    @classmethod
    def open(cls, directory: Path) -> TensorBoardSink | None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logger.info("TensorBoard off: the tensorboardX package is not installed (pip install tensorboardX)")
            return None
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("TensorBoard event files in %s", directory)
        return cls(SummaryWriter(logdir=str(directory), flush_secs=10))

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("steps") or 0)
        walltime = row.get("time")
        for name, value in fleet_scalars(row).items():
            self._writer.add_scalar(name, value, global_step=step, walltime=walltime)

    def close(self) -> None:
        self._writer.close()
