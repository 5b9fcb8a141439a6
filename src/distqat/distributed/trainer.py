"""Trainer (`distqat trainer`, started by the client; `distqat baseline` runs the same loop locally).

Takes batches (from the client's data server through shared memory, or, run on its own, from its own
copy of the dataset), pushes each through the pipeline, evaluates on held-out data every `data.eval_every`
steps, and publishes its progress to the DHT. A failed hop (timeout, dead peer, server error) is logged as
one line and the replica is avoided for `network.ban_time` seconds: a failed forward is retried at once on
another replica of the stage, a failed backward drops the micro-batch, which is retried whole on a fresh
route. With no route at all it waits for one, and the client stops it if the pipeline is gone for good.
With `pipelining.in_flight` > 1 it keeps that many micro-batches going through the stages at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from hivemind import DHT

from distqat.config import Config
from distqat.data import BatchStream, load_dataset
from distqat.data.consumer import SharedBatches
from distqat.distributed.evaluation import EvalResult, HeldOut
from distqat.distributed.pipeline import LocalPipeline, Pipeline, RemotePipeline, TrafficCounter
from distqat.errors import NoReplicaError, StageCallError, SwarmError
from distqat.swarm import records
from distqat.swarm.events import EventLog
from distqat.swarm.node import start_dht
from distqat.swarm.routing import Router
from distqat.swarm.rpc import StageClient

logger = logging.getLogger(__name__)

LOSS_WINDOW = 10  # steps averaged into first_loss_avg / loss_avg


@dataclass
class Progress:
    """A trainer's running totals, turned into a TrainerMetrics record or a run summary."""

    trainer_id: str
    step: int = 0
    samples: int = 0
    failures: int = 0
    last_error: str | None = None
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    first_losses: list[float] = field(default_factory=list)
    started: float | None = None  # monotonic time the first step started
    first_step_at: float = 0.0
    eval_step: int = 0
    last_eval: EvalResult | None = None
    batch_size: int = 0
    waiting: bool = False  # the last attempt found no route
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))  # seconds
    _step_began: float = 0.0

    def start_step(self) -> None:
        self._step_began = time.monotonic()
        if self.started is None:
            self.started = self._step_began

    def finish_step(self, loss: float, batch_size: int, began: float | None = None) -> None:
        """`began`: when this micro-batch started (several can be in flight); default: the last start_step."""
        self.step_times.append(time.monotonic() - (self._step_began if began is None else began))
        self.batch_size, self.waiting = batch_size, False
        self.step += 1
        self.samples += batch_size
        self.losses.append(loss)
        if len(self.first_losses) < LOSS_WINDOW:
            self.first_losses.append(loss)
        if self.step == 1:
            self.first_step_at = time.time()

    @property
    def train_time_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def record(self, peer_id: str, traffic: TrafficCounter, finished: bool = False) -> records.TrainerMetrics:
        train_time = self.train_time_s
        return records.TrainerMetrics(
            trainer_id=self.trainer_id,
            peer_id=peer_id,
            step=self.step,
            samples=self.samples,
            loss=self.losses[-1] if self.losses else float("nan"),
            loss_avg=sum(self.losses) / len(self.losses) if self.losses else float("nan"),
            first_loss_avg=sum(self.first_losses) / len(self.first_losses) if self.first_losses else float("nan"),
            samples_per_s=self.samples / train_time if train_time > 0 else 0.0,
            train_time_s=train_time,
            first_step_at=self.first_step_at,
            updated_at=time.time(),
            bytes_sent=traffic.bytes_sent,
            bytes_received=traffic.bytes_received,
            bytes_activations=traffic.bytes_sent + traffic.bytes_received,
            failures=self.failures,
            finished=finished,
            last_error=self.last_error,
            eval_step=self.eval_step,
            eval_loss=self.last_eval.loss if self.last_eval else None,
            eval_accuracy=self.last_eval.accuracy if self.last_eval else None,
            batch_size=self.batch_size,
            step_ms=1000.0 * sum(self.step_times) / len(self.step_times) if self.step_times else 0.0,
            waiting=self.waiting,
        )


class Batches(Protocol):
    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


def open_batches(config: Config, index: int) -> Batches:
    """The client's data server when it runs one (its address is in our environment), else our own stream."""
    shared = SharedBatches.from_env(f"trainer_{index}", config.data_server.timeout)
    if shared is not None:
        logger.info("taking batches from the data server")
        return shared
    return BatchStream(
        load_dataset(config.data),
        config.data,
        config.diloco.batch_size_per_step,
        seed=config.seed * 1000 + index,
        prefetch=config.data_server.prefetch,
        shuffle_buffer=config.data_server.shuffle_buffer,
    )


async def evaluate_now(pipeline: Pipeline, held_out: HeldOut, progress: Progress) -> None:
    """One held-out evaluation; a failed hop skips it (the next one comes `eval_every` steps later)."""
    try:
        result = await held_out.evaluate(pipeline)
    except (StageCallError, NoReplicaError) as error:
        logger.warning("eval at step %d skipped: %s", progress.step, error)
        return
    progress.eval_step, progress.last_eval = progress.step, result
    logger.info(
        "eval at step %d: loss %.4f accuracy %.4f (%d held-out samples)",
        progress.step,
        result.loss,
        result.accuracy,
        result.samples,
    )


async def _cancel_all(tasks: dict[asyncio.Task, Any]) -> None:
    """Cancel micro-batches in flight: stopping must not wait for a call to a dead peer to time out (the
    replicas forget what they kept for them)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def train(
    pipeline: Pipeline,
    batches: Batches,
    progress: Progress,
    max_steps: int,
    stop: threading.Event,
    on_no_route: asyncio.Event | None = None,
    retry_wait_s: float = 1.0,
    held_out: HeldOut | None = None,
    eval_every: int = 0,
    events: EventLog | None = None,
    in_flight: int = 1,
    poll_s: float = 0.2,
) -> None:
    """Train until `max_steps` (0: forever) or `stop`; hop failures are retried, other errors propagate.

    Keeps up to `in_flight` micro-batches (one step's batch each) going through the pipeline at once, so
    that every stage has work while the others compute; a step counts when its backward has returned.
    A micro-batch whose step failed is sent again whole, before any new batch."""
    running: dict[asyncio.Task, tuple[torch.Tensor, torch.Tensor, float]] = {}
    retry: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
    waiting_since: float | None = None
    resume_at = 0.0  # no new micro-batch before this time (no route: wait `retry_wait_s`)
    try:
        while not stop.is_set():
            while (
                len(running) < in_flight
                and (max_steps <= 0 or progress.step + len(running) < max_steps)
                and time.monotonic() >= resume_at
                and not stop.is_set()
            ):
                inputs, labels = retry.popleft() if retry else await asyncio.to_thread(batches.next)
                progress.start_step()
                task = asyncio.ensure_future(pipeline.train_step(inputs, labels))
                running[task] = (inputs, labels, time.monotonic())
            if not running:
                if max_steps > 0 and progress.step >= max_steps:
                    break
                await asyncio.to_thread(stop.wait, max(0.0, min(poll_s, resume_at - time.monotonic())))
                continue
            done, _ = await asyncio.wait(running, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                inputs, labels, began = running.pop(task)
                try:
                    loss = task.result()
                except (StageCallError, NoReplicaError) as error:
                    retry.append((inputs, labels))
                    progress.failures += 1
                    progress.last_error = str(error)
                    progress.waiting = isinstance(error, NoReplicaError)
                    if events is not None and isinstance(error, StageCallError):  # work done on it is lost
                        events.emit("step_failed", step=progress.step + 1, error=str(error))
                    # A failed call is news; waiting for a replica is logged once, then every 30 s.
                    if (
                        isinstance(error, StageCallError)
                        or waiting_since is None
                        or time.monotonic() - waiting_since > 30
                    ):
                        logger.error("step %d failed: %s", progress.step + 1, error)
                        waiting_since = time.monotonic() if isinstance(error, NoReplicaError) else None
                    if on_no_route is not None:
                        on_no_route.set()  # ask for a fresh view of the swarm before retrying
                    if isinstance(error, NoReplicaError):
                        resume_at = time.monotonic() + retry_wait_s
                    # After a failed call the replica at fault is banned: the retry goes elsewhere at once.
                    continue
                waiting_since = None
                progress.finish_step(loss, len(labels), began)
                if events is not None:
                    events.emit("step", step=progress.step)
                logger.info(
                    "step %d loss %.4f (avg %.4f) %.1f samples/s",
                    progress.step,
                    loss,
                    sum(progress.losses) / len(progress.losses),
                    progress.samples / progress.train_time_s,
                )
                if held_out is not None and eval_every > 0 and progress.step % eval_every == 0:
                    await evaluate_now(pipeline, held_out, progress)
    finally:
        await _cancel_all(running)


class ReplicaDialer:
    """Dials every replica the trainer learns of, in the background, before any micro-batch goes there: a
    server that just filled a gap then gets its first micro-batch without the connection set-up on top."""

    def __init__(self, client: StageClient, timeout: float):
        self._client, self._timeout = client, timeout
        self._seen: set[tuple[str, str]] = set()
        self._dials: set[asyncio.Task] = set()

    def saw(self, replicas: Mapping[str, Sequence[records.ServerInfo]]) -> None:
        for info in (info for infos in replicas.values() for info in infos):
            if (info.uid, info.peer_id) not in self._seen:
                self._seen.add((info.uid, info.peer_id))
                dial = asyncio.create_task(self._client.prepare(info, self._timeout))
                self._dials.add(dial)
                dial.add_done_callback(self._dials.discard)

    async def close(self) -> None:
        await _cancel_all({dial: None for dial in self._dials})


async def _refresh_routes_once(dht: DHT, config: Config, router: Router, dialer: ReplicaDialer) -> None:
    try:
        replicas = await asyncio.to_thread(
            records.fetch_replicas, dht, config.experiment_prefix, router.stage_names, config.network.dht_timeout
        )
        router.update(replicas)
        dialer.saw(replicas)
    except SwarmError as error:
        logger.warning("could not refresh replicas: %s", error)


async def _refresh_routes(
    dht: DHT, config: Config, router: Router, stop: threading.Event, wake: asyncio.Event, dialer: ReplicaDialer
):
    """Refresh every poll period, or at once when a failed step sets `wake`."""
    while not stop.is_set():
        wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), config.network.client_poll_period)
        await _refresh_routes_once(dht, config, router, dialer)


async def _publish(dht: DHT, config: Config, record: records.TrainerMetrics) -> None:
    try:
        await asyncio.to_thread(
            records.publish_trainer_metrics, dht, config.experiment_prefix, record, config.network.dht_timeout
        )
    except SwarmError as error:
        logger.warning("could not publish metrics: %s", error)


async def _publish_metrics(dht, config, progress, traffic, stop: threading.Event, peer_id: str) -> None:
    while not stop.is_set():
        await asyncio.to_thread(stop.wait, config.network.metrics_period)
        if progress.step > 0:
            await _publish(dht, config, progress.record(peer_id, traffic))


async def _train_in_swarm(
    config: Config,
    dht: DHT,
    batches: Batches,
    progress: Progress,
    max_steps: int,
    stop: threading.Event,
    held_out: HeldOut | None = None,
) -> None:
    p2p = await dht.replicate_p2p()
    events = EventLog(progress.trainer_id)

    def route_lost(uid: str, why: str) -> None:
        logger.warning("not routing to %s any more: %s", uid, why)
        events.emit("route_lost", uid=uid, why=why)

    router = Router(
        config.model_pipeline.stage_names,
        ban_time=config.network.ban_time,
        on_lost=route_lost,
        on_found=lambda uid: events.emit("route_found", uid=uid),
    )
    pipeline = RemotePipeline(config, StageClient.for_network(p2p, config.network), router)
    dialer = ReplicaDialer(pipeline.client, config.network.dht_timeout)
    peer_id = dht.peer_id.to_base58()
    wake = asyncio.Event()
    helpers_stop = threading.Event()
    await _refresh_routes_once(dht, config, router, dialer)
    helpers = [
        asyncio.create_task(_refresh_routes(dht, config, router, helpers_stop, wake, dialer)),
        asyncio.create_task(_publish_metrics(dht, config, progress, pipeline.traffic, helpers_stop, peer_id)),
    ]
    try:
        await train(
            pipeline,
            batches,
            progress,
            max_steps,
            stop,
            on_no_route=wake,
            held_out=held_out,
            eval_every=config.data.eval_every,
            events=events,
            in_flight=config.pipelining.in_flight,
        )
        finished = max_steps > 0 and progress.step >= max_steps
        await _publish(dht, config, progress.record(peer_id, pipeline.traffic, finished=finished))
        logger.info(
            "trainer stopped at step %d (%d samples, %d failed steps)",
            progress.step,
            progress.samples,
            progress.failures,
        )
    finally:
        helpers_stop.set()
        await asyncio.gather(*helpers, return_exceptions=True)
        await dialer.close()
        pipeline.client.close()
        await p2p.shutdown()


def run_trainer(config: Config, index: int, stop: threading.Event, max_steps: int) -> None:
    batches = open_batches(config, index)
    try:
        held_out = HeldOut(config) if config.data.eval_every > 0 else None
        progress = Progress(trainer_id=f"trainer_{index}")
        dht = start_dht(config.network, client_mode=True)
        try:
            asyncio.run(_train_in_swarm(config, dht, batches, progress, max_steps, stop, held_out))
        finally:
            dht.shutdown()
    finally:
        batches.close()


def run_baseline(
    config: Config, max_steps: int, stop: threading.Event, summary_path: Path | None, save_state: Path | None = None
) -> dict:
    """Train the same stages in this one process, with the same data, batch size and optimiser.

    `save_state`: write every stage's trained state there (`distqat.stage_state`, what `distqat export` reads)."""
    dataset = load_dataset(config.data)
    batches = BatchStream(
        dataset,
        config.data,
        config.diloco.batch_size_per_step,
        seed=config.seed * 1000,
        prefetch=config.data_server.prefetch,
        shuffle_buffer=config.data_server.shuffle_buffer,
    )
    held_out = HeldOut(config) if config.data.eval_every > 0 else None
    pipeline = LocalPipeline(config)
    progress = Progress(trainer_id="baseline")
    started = time.monotonic()
    try:
        asyncio.run(
            train(pipeline, batches, progress, max_steps, stop, held_out=held_out, eval_every=config.data.eval_every)
        )
    finally:
        batches.close()
    record = progress.record(peer_id="local", traffic=pipeline.traffic, finished=True)
    if save_state is not None:
        from distqat.stage_state import save_stage_states

        save_stage_states(save_state, config, dict(enumerate(pipeline.stages)))
        logger.info("stage states written to %s", save_state)
    summary = {
        "mode": "baseline",
        "steps": record.step,
        "samples": record.samples,
        "first_loss": record.first_loss_avg,
        "last_loss": record.loss_avg,
        "wall_s": time.monotonic() - started,
        "samples_per_s": record.samples_per_s,
        "pipelines": 1,
        "servers": 0,
        "eval_loss": record.eval_loss,
        "eval_accuracy": record.eval_accuracy,
    }
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))
    return summary
