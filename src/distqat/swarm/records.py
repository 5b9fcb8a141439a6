"""The DHT contract: key names, record types and expirations, spelled in this one place.

Records are versioned pydantic models that ignore unknown fields, so a newer peer that adds a field
never crashes an older one; a record that does not validate (wrong type, negative count, version 0) is
skipped with one log line, not fatal. New fields are optional with a default, so an older peer's record
still validates here.

Keys (one DHT key per kind, one subkey per peer):
  `{prefix}:stage:{stage}`   subkey = server uid   -> ServerInfo     (heartbeat, expires after heartbeat_expiry)
  `{prefix}:trainers`        subkey = trainer id   -> TrainerMetrics (expires after TRAINER_RECORD_TTL)
  `{prefix}:diloco:{stage}`  subkey = peer id      -> RoundOutcome   (expires after ROUND_OUTCOME_TTL)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, Literal, TypeVar

from hivemind import DHT
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, ValidationError

from distqat.errors import SwarmError

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
TRAINER_RECORD_TTL = 60.0  # seconds: the monitor still sees a trainer that finished a while ago
ROUND_OUTCOME_TTL = 300.0  # seconds: outlives any averaging round


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: int = Field(RECORD_VERSION, ge=1)


class ServerInfo(Record):
    """What a stage server announces about itself in every heartbeat."""

    uid: str
    peer_id: str
    maddrs: list[str]
    stage: str
    stage_index: int
    expert_index: int
    device: str
    state: Literal["ready"] = "ready"
    samples: NonNegativeInt = 0  # samples it has trained on (backward passes)
    steps: NonNegativeInt = 0  # inner optimiser steps
    samples_per_s: NonNegativeFloat = 0.0  # recent training throughput
    queue: int = 0  # calls waiting for or holding its compute thread at the heartbeat
    weights_digest: float = 0.0  # sum of all parameters: tells at a glance whether (and how) weights moved
    started_at: float = 0.0  # unix time
    updated_at: float = 0.0  # unix time of this heartbeat
    diloco_round: int = 0  # DiLoCo rounds applied
    round_samples: int = 0  # samples trained since its last averaging attempt: the stage's progress to the next
    averaging: bool = False  # in an averaging round now: the other replicas of the stage join at once
    outer_digest: str = ""  # hash of θ₀: equal on replicas that applied the same rounds
    rounds_failed: int = 0  # averaging attempts that were not applied
    bytes_activations: NonNegativeInt = 0  # stage traffic (forward inputs/outputs, gradients), both directions
    bytes_averaging: NonNegativeInt = 0  # all-reduce traffic, both directions
    # Added for the monitor's live view (optional: older servers do not send them).
    forward_ms: NonNegativeFloat = 0.0  # recent mean time of a forward call here, queueing included
    backward_ms: NonNegativeFloat = 0.0  # recent mean time of a backward call here, queueing included
    in_flight: NonNegativeInt = 0  # micro-batches whose forward ran and whose backward has not come yet
    batch_size: NonNegativeInt = 0  # samples in the last backward it served
    # Added for pipelining (issue 7; optional: older servers do not send them).
    utilisation: float = Field(0.0, ge=0, le=1)  # busy time / wall time of its compute thread, last ~5 s
    busy_s: NonNegativeFloat = 0.0  # seconds its compute thread has been busy since it started
    refused: NonNegativeInt = 0  # forwards refused with a busy reply (its queue was full)
    # Added for the direct tensor channel (optional: older servers do not send it; "" means p2p only).
    tensor_addr: str = ""  # "host:port" of its direct TCP tensor channel (swarm/direct.py)


class TrainerMetrics(Record):
    """What a trainer publishes about its progress."""

    trainer_id: str
    peer_id: str
    step: NonNegativeInt
    samples: NonNegativeInt
    loss: float  # loss of the last step
    loss_avg: float  # mean loss of the last LOSS_WINDOW steps
    first_loss_avg: float  # mean loss of the first LOSS_WINDOW steps
    samples_per_s: float  # samples / train_time_s
    train_time_s: float  # seconds since its first step started
    first_step_at: float  # unix time its first step finished
    updated_at: float  # unix time of this record
    bytes_sent: NonNegativeInt = 0
    bytes_received: NonNegativeInt = 0
    bytes_activations: NonNegativeInt = 0  # stage traffic, both directions (a trainer does no averaging)
    failures: NonNegativeInt = 0
    finished: bool = False
    last_error: str | None = None
    eval_step: int = 0  # step of the last held-out evaluation (0: none yet)
    eval_loss: float | None = None  # mean loss on the held-out samples
    eval_accuracy: float | None = None  # fraction of held-out labels (llm: tokens) predicted right
    # Added for the monitor's live view (optional: older trainers do not send them).
    batch_size: NonNegativeInt = 0  # samples per step
    step_ms: NonNegativeFloat = 0.0  # mean wall time of its recent steps (forward + backward through all stages)
    waiting: bool = False  # its last step found no route (a stage without a live replica)


class RoundOutcome(Record):
    """What a replica reports after an averaging attempt; its group applies the round only if all agree."""

    peer_id: str
    uid: str
    round: int
    group: str  # group_id() of the members; "" when the attempt failed before the group was known
    ok: bool
    digest: str  # tensors_digest of the averaged result
    updated_at: float = 0.0


def group_id(peer_ids: Iterable[str]) -> str:
    return hashlib.blake2b("|".join(sorted(peer_ids)).encode(), digest_size=8).hexdigest()


def stage_key(prefix: str, stage: str) -> str:
    return f"{prefix}:stage:{stage}"


def trainers_key(prefix: str) -> str:
    return f"{prefix}:trainers"


def round_outcome_key(prefix: str, stage: str) -> str:
    return f"{prefix}:diloco:{stage}"


R = TypeVar("R", bound=Record)


def _store(dht: DHT, key: str, subkey: str, value: dict[str, Any], ttl: float, timeout: float) -> None:
    future = dht.store(key, value, expiration_time=get_dht_time() + ttl, subkey=subkey, return_future=True)
    try:
        stored = future.result(timeout=timeout)
    except (FutureTimeoutError, TimeoutError):  # distinct classes before Python 3.11
        future.cancel()
        raise SwarmError(f"DHT store of '{key}' timed out after {timeout:.0f} s") from None
    if not stored:
        logger.debug("DHT store of %s/%s was not accepted by any node", key, subkey)


def parse_record(record_type: type[R], value: Any, where: str) -> R | None:
    """A record from what a peer stored, or None (and one warning line) when it does not validate."""
    try:
        return record_type.model_validate(value)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '<record>'}: {item['msg']}" for item in error.errors()
        )
        logger.warning("ignoring malformed %s record %s: %s", record_type.__name__, where, problems)
        return None


def _get_subkeys(dht: DHT, key: str, record_type: type[R], timeout: float) -> list[R]:
    future = dht.get(key, latest=True, return_future=True)
    try:
        found = future.result(timeout=timeout)
    except (FutureTimeoutError, TimeoutError):  # distinct classes before Python 3.11
        future.cancel()
        raise SwarmError(f"DHT get of '{key}' timed out after {timeout:.0f} s") from None
    if found is None or not isinstance(found.value, dict):
        return []
    parsed = (parse_record(record_type, entry.value, f"{subkey} under {key}") for subkey, entry in found.value.items())
    return [record for record in parsed if record is not None]


def announce_server(dht: DHT, prefix: str, info: ServerInfo, ttl: float, timeout: float) -> None:
    _store(dht, stage_key(prefix, info.stage), info.uid, info.model_dump(), ttl, timeout)


def fetch_replicas(dht: DHT, prefix: str, stage_names: Iterable[str], timeout: float) -> dict[str, list[ServerInfo]]:
    """Live replicas of every stage, sorted by expert index."""
    replicas = {}
    for stage in stage_names:
        found = _get_subkeys(dht, stage_key(prefix, stage), ServerInfo, timeout)
        replicas[stage] = sorted((info for info in found if info.stage == stage), key=lambda info: info.expert_index)
    return replicas


def publish_trainer_metrics(dht: DHT, prefix: str, metrics: TrainerMetrics, timeout: float) -> None:
    _store(dht, trainers_key(prefix), metrics.trainer_id, metrics.model_dump(), TRAINER_RECORD_TTL, timeout)


def fetch_trainer_metrics(dht: DHT, prefix: str, timeout: float) -> list[TrainerMetrics]:
    return sorted(_get_subkeys(dht, trainers_key(prefix), TrainerMetrics, timeout), key=lambda m: m.trainer_id)


def publish_round_outcome(dht: DHT, prefix: str, stage: str, outcome: RoundOutcome, timeout: float) -> None:
    outcome.updated_at = time.time()
    key = round_outcome_key(prefix, stage)
    _store(dht, key, outcome.peer_id, outcome.model_dump(), ROUND_OUTCOME_TTL, timeout)


def fetch_round_outcomes(dht: DHT, prefix: str, stage: str, timeout: float) -> dict[str, RoundOutcome]:
    """The latest outcome each replica of `stage` reported, by peer id."""
    outcomes = _get_subkeys(dht, round_outcome_key(prefix, stage), RoundOutcome, timeout)
    return {outcome.peer_id: outcome for outcome in outcomes}


# --- run progress and the param mirror (checkpoints, resume) ---
#   `{prefix}:run`     subkey = "progress"   -> RunProgress (the monitor's step count; expires after RUN_RECORD_TTL)
#   `{prefix}:mirror`  subkey = peer id      -> MirrorInfo  (the mirror's heartbeat; expires after heartbeat_expiry)

RUN_RECORD_TTL = 60.0  # seconds


class RunProgress(Record):
    """The run's step count as the monitor sees it (every life of every trainer, plus where a resume started)."""

    steps: NonNegativeInt = 0
    samples: NonNegativeInt = 0
    updated_at: float = 0.0


class MirroredStage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    round: NonNegativeInt = 0  # DiLoCo rounds applied in the held state
    steps: NonNegativeInt = 0  # inner steps of the replica it came from
    pulled_at: float = 0.0  # unix time


class MirrorInfo(Record):
    """What a param mirror holds: the stages whose state it serves to joiners."""

    peer_id: str
    stages: dict[str, MirroredStage] = Field(default_factory=dict)
    updated_at: float = 0.0


def run_key(prefix: str) -> str:
    return f"{prefix}:run"


def mirror_key(prefix: str) -> str:
    return f"{prefix}:mirror"


def publish_run_progress(dht: DHT, prefix: str, progress: RunProgress, timeout: float) -> None:
    progress.updated_at = time.time()
    _store(dht, run_key(prefix), "progress", progress.model_dump(), RUN_RECORD_TTL, timeout)


def fetch_run_progress(dht: DHT, prefix: str, timeout: float) -> RunProgress | None:
    found = _get_subkeys(dht, run_key(prefix), RunProgress, timeout)
    return max(found, key=lambda progress: progress.updated_at) if found else None


def announce_mirror(dht: DHT, prefix: str, info: MirrorInfo, ttl: float, timeout: float) -> None:
    info.updated_at = time.time()
    _store(dht, mirror_key(prefix), info.peer_id, info.model_dump(), ttl, timeout)


def fetch_mirrors(dht: DHT, prefix: str, timeout: float) -> list[MirrorInfo]:
    return _get_subkeys(dht, mirror_key(prefix), MirrorInfo, timeout)
