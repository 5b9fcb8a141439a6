"""DiLoCo on a stage server: when to average, the round itself, and the state a joining replica downloads.

The server calls this from its heartbeat loop with the live replicas of its stage (their `ServerInfo`):
a round starts when the stage's progress says so (`optim.collaborative`), a replica that sees a peer
past its round downloads the state of the most advanced replica, and so does a new replica before it
serves. Rounds and state access run on the server's compute thread, so no inner step overlaps them.

The state a replica shares is its module (params and buffers), inner optimiser, θ₀, outer optimiser and
round counter, serialised with `torch.save` into one byte tensor: exact, and one stream to download.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import torch
from hivemind import DHT

from distqat.config import Config
from distqat.distributed.optim.collaborative import PeerProgress, ahead_of, round_due
from distqat.distributed.optim.diloco import AveragingResult, DiLoCo, PresetAverager, RoundReport, RoundStatus
from distqat.distributed.replica import StageReplica
from distqat.swarm.averaging import StageAverager
from distqat.swarm.records import ServerInfo

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
MIRROR_PRIORITY = -1.0  # the param mirror's state-sharing priority: below every live replica
JOINING_PRIORITY = -2.0  # a replica's before its first heartbeat: below the mirror


class StageSync:
    def __init__(
        self,
        config: Config,
        dht: DHT,
        info: ServerInfo,
        replica: StageReplica,
        on_compute: Callable[[Callable[[], Any]], Any],
    ):
        self.config, self.info, self.replica = config, info, replica
        self._on_compute = on_compute  # runs a function on the server's compute thread and returns its result
        settings = config.diloco
        self.samples_per_replica = settings.inner_steps * settings.batch_size_per_step
        self.diloco = DiLoCo(list(replica.module.parameters()), settings.outer_optim)
        self.rounds_failed = 0
        self.last_attempt_at = time.time()
        self._partners = 0  # live replicas of the stage besides this one, at the last look
        self._schedule_done_logged = False
        self.averager = StageAverager(
            dht,
            experiment_prefix=config.experiment_prefix,
            stage=info.stage,
            uid=info.uid,
            templates=self.diloco.params,
            compression=settings.compression,
            matchmaking_time=settings.matchmaking_time,
            # hivemind's matchmaking can deadlock when a request may outlast the matchmaking window.
            request_timeout=min(config.network.dht_timeout, settings.matchmaking_time / 2),
            dht_timeout=config.network.dht_timeout,
            outer_digest=self.diloco.outer_digest,
            allreduce_timeout=settings.averaging_timeout,
            state_provider=self._state_for_peer,
        )
        # Until its first heartbeat sets a priority from real progress, a joining replica ranks below the param
        # mirror (JOINING_PRIORITY < MIRROR_PRIORITY): another joiner must not download its untrained state.
        self.averager.set_priority(JOINING_PRIORITY)

    # --- progress ---

    def record_step(self, samples: int) -> None:
        self.diloco.record_inner_step(samples)

    def describe(self, info: ServerInfo) -> None:
        """Fill the DiLoCo fields of this server's heartbeat (call on the compute thread)."""
        info.diloco_round = self.diloco.round
        info.round_samples = self.diloco.samples_since_attempt
        info.outer_digest = self.diloco.outer_digest()
        info.rounds_failed = self.rounds_failed
        info.bytes_averaging = self.averager.bytes_sent + self.averager.bytes_received
        # Joiners download from the most advanced replica: rounds first, then samples trained.
        self.averager.set_priority(self.diloco.round * 1e12 + self.replica.samples)

    async def tick(
        self, peers: list[ServerInfo], run: Callable[..., Any], announce: Callable[[], Awaitable[None]]
    ) -> None:
        """Called every heartbeat with the other live replicas of the stage; `run` awaits the compute thread,
        `announce` sends a heartbeat now."""
        self._partners = len(peers)
        progress = [PeerProgress(p.diloco_round, p.round_samples, p.updated_at, p.averaging) for p in peers]
        behind = ahead_of(self.diloco.round, progress)
        if behind is not None:
            logger.warning(
                "a replica of '%s' is at round %d, this one at %d: catching up",
                self.info.stage,
                behind,
                self.diloco.round,
            )
            await run(self.catch_up)
            return
        if self.diloco.round >= self.config.diloco.outer_steps:
            if not self._schedule_done_logged:
                logger.info("DiLoCo schedule complete (%d rounds): no more averaging", self.diloco.round)
                self._schedule_done_logged = True
            return
        samples = self.diloco.samples_since_attempt
        if round_due(self.diloco.round, samples, progress, self.last_attempt_at, self.samples_per_replica):
            if peers:
                self.info.averaging = True
                await announce()  # the other replicas join as soon as they see it, not at their own count
            try:
                report = await run(self.run_round)
            finally:
                self.info.averaging = False
            self._log(report)

    def run_round(self) -> RoundReport:
        started = time.monotonic()
        # Alone in the stage, there is nobody to meet: apply our own pseudo-gradient without matchmaking.
        averager = self.averager if self._partners else PresetAverager(AveragingResult(RoundStatus.ALONE))
        report = self.diloco.run_round(averager, self.config.diloco.averaging_timeout)
        self.last_attempt_at = time.time()
        if report.status is RoundStatus.FAILED:
            self.rounds_failed += 1
        else:
            self.replica.weights_version += 1  # params changed: graphs kept for pending backwards are stale
        report.seconds = time.monotonic() - started
        return report

    def _log(self, report: RoundReport) -> None:
        if report.status is RoundStatus.FAILED:
            logger.warning(
                "round %d not applied (%.1f s), training on: %s", report.round_id, report.seconds, report.detail
            )
        else:
            logger.info(
                "round %d applied in %.1f s (%s, group of %d, weight %d samples)",
                report.round_id,
                report.seconds,
                report.status.value,
                report.group_size,
                report.weight,
            )

    # --- state ---

    def _state_for_peer(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Called by the averager when a peer downloads our state (on hivemind's thread)."""
        return self._on_compute(self._snapshot)

    def _snapshot(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return pack_state(
            self.replica.module,
            self.replica.optimizer,
            self.diloco,
            self.info.stage,
            self.info.uid,
            samples=self.replica.samples,
            steps=self.replica.weights_version,
        )

    def catch_up(self) -> bool:
        """Replace this replica's state by the most advanced live replica's; False if none could give it."""
        started = time.monotonic()
        with _still_waiting(f"downloading the state of '{self.info.stage}' from a live replica"):
            downloaded = self.averager.load_state(timeout=self.config.network.dht_timeout)
        if downloaded is None:
            return False
        metadata, tensors = downloaded
        problem = unpack_state(
            metadata, tensors, self.replica.module, self.replica.optimizer, self.diloco, self.info.stage
        )
        if problem:
            logger.warning("could not load a replica's state: %s", problem)
            return False
        self.replica.weights_version += 1
        self.last_attempt_at = time.time()
        logger.info(
            "loaded the state of %s (round %d, %.1f MiB) in %.2f s",
            metadata.get("uid"),
            self.diloco.round,
            tensors[0].numel() / 2**20,
            time.monotonic() - started,
        )
        return True

    def shutdown(self) -> None:
        self.averager.shutdown()


@contextlib.contextmanager
def _still_waiting(what: str, every_s: float = 2.0) -> Iterator[None]:
    """Log `what` and the seconds so far every `every_s` while the body runs: hivemind's state download
    reports no progress of its own, and a large stage takes a while."""
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        while not done.wait(every_s):
            logger.info("%s: %.0f s so far", what, time.monotonic() - started)

    reporter = threading.Thread(target=report, name="still-waiting", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def pack_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    diloco: DiLoCo,
    stage: str,
    uid: str,
    samples: int = 0,
    steps: int = 0,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """A replica's whole state as (metadata, [one byte tensor]), the form hivemind's state download carries."""
    state = {"module": module.state_dict(), "inner_optimizer": optimizer.state_dict(), "diloco": diloco.state_dict()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    metadata = {"format": STATE_FORMAT, "stage": stage, "uid": uid, "round": diloco.round}
    return {**metadata, "samples": samples, "steps": steps}, [blob]


def read_packed_state(tensors: list[torch.Tensor]) -> dict[str, Any]:
    """The nested state inside a packed state's byte tensor (raises on a damaged one)."""
    return torch.load(io.BytesIO(tensors[0].numpy().tobytes()), weights_only=True)


def unpack_state(
    metadata: Any,
    tensors: list[torch.Tensor],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    diloco: DiLoCo,
    stage: str,
) -> str | None:
    """Load a packed state into this replica; None on success, else why it was refused (nothing is changed)."""
    if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT or len(tensors) != 1:
        return f"unknown state format {metadata!r}"
    if metadata.get("stage") != stage:
        return f"{metadata.get('uid')} sent the state of stage '{metadata.get('stage')}', this is '{stage}'"
    try:
        state = read_packed_state(tensors)
    except (RuntimeError, ValueError, EOFError) as error:
        return f"{metadata.get('uid')} sent an unreadable state: {error}"
    problem = load_replica_state(state, module, optimizer, diloco)
    return f"{metadata.get('uid')} sent a state that does not fit this replica: {problem}" if problem else None


def load_replica_state(
    state: Any, module: torch.nn.Module, optimizer: torch.optim.Optimizer, diloco: DiLoCo | None
) -> str | None:
    """Load module, inner optimiser and (when given) DiLoCo state: all or none. None on success, else why not."""
    # A half-loaded replica would be worse than a fresh one: keep copies to put back.
    backup = (
        copy.deepcopy(module.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        diloco.state_dict() if diloco is not None else None,
    )
    try:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["inner_optimizer"])
        if diloco is not None:
            if state.get("diloco") is None:
                raise KeyError("diloco (the state was saved with diloco.enable false)")
            diloco.load_state_dict(state["diloco"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        module.load_state_dict(backup[0])
        optimizer.load_state_dict(backup[1])
        if diloco is not None:
            diloco.load_state_dict(backup[2])
        return str(error)
    return None
