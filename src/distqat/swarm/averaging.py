"""Averaging the replicas of one stage through hivemind's all-reduce, with every round verified.

`StageAverager` implements DiLoCo's `Averager` on `hivemind.averaging.DecentralizedAverager`, with the
group key of one stage, so exactly the replicas of that stage meet. Three things are ours:

- **Identical results.** hivemind returns each peer `local + (average - local)`, compressed per receiver,
  so peers end a round with values that differ in the last bits (and by the codec's error under
  fp16/int8). Our runner makes every reducer send the average itself, encoded once, and the reducer
  decodes its own part from the same encoding: every member decodes the same bytes.
- **Verified rounds.** When a peer dies or freezes mid-round, hivemind reports success while the parts
  that peer reduced keep local values. Our runner fails the round on any failed reducer or dropped
  sender, and the members then compare, through the DHT, the round, θ₀ and a digest of the result:
  a round is applied only if every member of the group reports the same digest.
- **Accounting.** Bytes of tensor parts really sent and received are counted in shared memory.

Pseudo-gradients travel as `none`, `fp16` or `int8` (`swarm.codecs`).

Donors for joining replicas are chosen by `state_sharing_priority`, which the server sets from real
progress (rounds applied, then samples), so a fresh peer is never picked over a trained one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished

from distqat.distributed.optim.diloco import AveragingResult, RoundStatus, tensors_digest
from distqat.errors import SwarmError
from distqat.swarm import records
from distqat.swarm.codecs import CODECS

logger = logging.getLogger(__name__)

VERIFY_POLL_S = 0.2
# Fault injection: when set, the averager touches this file as its all-reduce starts, so a test or a demo
# can kill or freeze a replica in the middle of a round rather than hope to hit it.
ALLREDUCE_STARTED_FILE_ENV = "DISTQAT_ALLREDUCE_STARTED_FILE"


def _roundtrip(tensor: torch.Tensor, compression_type: int) -> torch.Tensor:
    return deserialize_torch_tensor(serialize_torch_tensor(tensor, compression_type))


class _ExactRunner(AllReduceRunner):
    """An all-reduce whose members all end with the same bytes, and that fails rather than go partial."""

    def __init__(self, *args: Any, traffic: torch.Tensor, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tensor_part_container.return_deltas = False  # outputs are averages, failed parts keep local values
        self.traffic = traffic  # int64[2] in shared memory: bytes sent, bytes received
        self.part_compression = self.tensor_part_container.compression.compression_type

    def partial(self) -> str | None:
        if self.tensor_part_container.failed_size:
            return f"{self.tensor_part_container.failed_size} elements were not averaged (a reducer failed)"
        if self.banned_senders:
            return f"{len(self.banned_senders)} member(s) stopped sending mid-round"
        return None

    async def _generate_input_for_peer(self, peer_index: int):
        async for message in super()._generate_input_for_peer(peer_index):
            self.traffic[0] += message.tensor_part.ByteSize()
            yield message

    async def _communicate_with_peer(self, peer_id):
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, part in enumerate(self.parts_for_local_averaging):
                average = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, self.weight)
                # Decode our own part from the same encoding the other members receive.
                own = await asyncio.get_running_loop().run_in_executor(None, _roundtrip, average, self.part_compression)
                self.tensor_part_container.register_processed_part(peer_index, part_index, own)
            return
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            def decode(message: averaging_pb2.AveragingData) -> tuple[torch.Tensor, int]:
                if message.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(message.code)}")
                return deserialize_torch_tensor(message.tensor_part), message.tensor_part.ByteSize()

            received = 0
            async for average, size in amap_in_executor(
                decode,
                aiter_with_timeout(stream, self.reducer_timeout),
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                self.traffic[1] += size  # counted on the event loop: executor threads would race
                self.tensor_part_container.register_processed_part(peer_index, received, average)
                received += 1
            expected = self.tensor_part_container.num_parts_by_peer[peer_index]
            if received != expected:
                raise AllreduceException(f"{peer_id} sent {received} averaged parts, expected {expected}")
        except BaseException:
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        # Reply with the average itself (not average - sender's part): every member gets the same bytes.
        received = 0
        try:
            loop = asyncio.get_running_loop()

            def decode(message: averaging_pb2.AveragingData):
                part = message.tensor_part
                return deserialize_torch_tensor(part), message.weight, part.compression, part.ByteSize()

            async for part, weight, compression, size in amap_in_executor(
                decode, stream, max_prefetch=self.tensor_part_container.prefetch
            ):
                self.traffic[1] += size
                average = await self.tensor_part_reducer.accumulate_part(sender_index, received, part, weight=weight)
                received += 1
                encoded = await loop.run_in_executor(None, serialize_torch_tensor, average, compression)
                self.traffic[0] += encoded.ByteSize()
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=encoded)
        finally:
            if received != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class _VerifyingAverager(DecentralizedAverager):
    """DecentralizedAverager with the exact runner, a shared traffic counter and a pluggable state."""

    def __init__(self, *args: Any, state_provider: Callable[[], tuple[Any, list[torch.Tensor]]], **kwargs: Any):
        self.traffic = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.state_provider = state_provider
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = _ExactRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            traffic=self.traffic,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise AllreduceException("stage averagers are never auxiliary")
        if os.environ.get(ALLREDUCE_STARTED_FILE_ENV):
            with open(os.environ[ALLREDUCE_STARTED_FILE_ENV], "w") as marker:
                marker.write(str(os.getpid()))
        averages = [average async for average in runner]
        problem = runner.partial()
        if problem:
            raise AllreduceException(f"partial round: {problem}")
        for tensor, average in zip(tensors, averages, strict=True):
            tensor.copy_(average)  # only a complete round touches the buffers

    async def _shutdown(self, timeout: float | None) -> None:
        await super()._shutdown(timeout)
        # hivemind leaves the averager's own P2P client open, and its socket file behind in /tmp.
        await self._p2p.shutdown()

    def get_current_state(self):
        metadata, tensors = self.state_provider()
        return metadata, tensors, None


def averager_prefix(experiment_prefix: str, stage: str) -> str:
    # hivemind's group keys may not contain '.'
    return f"{experiment_prefix}_{stage}_diloco".replace(".", "_")


class StageAverager:
    """DiLoCo's Averager for one replica: hivemind all-reduce with the replicas of its stage, verified."""

    def __init__(
        self,
        dht: DHT,
        *,
        experiment_prefix: str,
        stage: str,
        uid: str,
        templates: Sequence[torch.Tensor],
        compression: str,
        matchmaking_time: float,
        request_timeout: float,
        dht_timeout: float,
        outer_digest: Callable[[], str],
        allreduce_timeout: float,
        state_provider: Callable[[], tuple[Any, list[torch.Tensor]]],
    ):
        self.dht, self.experiment_prefix, self.stage, self.uid = dht, experiment_prefix, stage, uid
        self.dht_timeout = dht_timeout
        self.matchmaking_time = matchmaking_time
        self._outer_digest = outer_digest
        previous_sigint = signal.getsignal(signal.SIGINT)
        self._averager = _VerifyingAverager(
            averaged_tensors=[torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in templates],
            dht=dht,
            start=True,
            prefix=averager_prefix(experiment_prefix, stage),
            min_group_size=2,
            min_matchmaking_time=matchmaking_time,
            request_timeout=request_timeout,
            compression=CODECS[compression],
            allreduce_timeout=allreduce_timeout,
            # A loaded CPU can stall a healthy peer for seconds: only a quarter of the round marks it dead.
            next_chunk_timeout=max(request_timeout, 5.0, allreduce_timeout / 4),
            allow_state_sharing=True,
            declare_state_period=5.0,
            state_provider=state_provider,
        )
        signal.signal(signal.SIGINT, previous_sigint)  # hivemind ignores SIGINT in the caller: undo that

    @property
    def bytes_sent(self) -> int:
        return int(self._averager.traffic[0])

    @property
    def bytes_received(self) -> int:
        return int(self._averager.traffic[1])

    def set_priority(self, priority: float) -> None:
        self._averager.state_sharing_priority = priority

    def share_state(self, allowed: bool) -> None:
        """Advertise this peer as a donor of the stage's state (or stop): the param mirror, once it holds one."""
        self._averager.allow_state_sharing = allowed

    def average(self, tensors: Sequence[torch.Tensor], weight: float, round_id: int, timeout: float) -> AveragingResult:
        started = time.time()
        outer = self._outer_digest()
        with self._averager.get_tensors() as buffers:
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor)
        gather = {"uid": self.uid, "round": round_id, "outer": outer}
        control = None
        try:
            # Bounded twice: hivemind's `timeout` covers only matchmaking, its allreduce_timeout the rest.
            control = self._averager.step(
                gather=gather, weight=max(weight, 1e-9), timeout=timeout, allow_retries=False, wait=False
            )
            gathered = control.result(timeout=2 * timeout + 5.0)
        except Exception as error:  # hivemind raises its own exception types, and TimeoutError
            if control is not None and not control.done():
                control.cancel()
            if "could not find a group" in str(error):
                # The caller averages only while other replicas are live (alone, it applies its own
                # pseudo-gradient without us): applying alone here would give this replica another θ₀.
                return AveragingResult(RoundStatus.FAILED, detail="no other replica joined the round in time")
            self._publish(round_id, "", ok=False, digest="")
            return AveragingResult(RoundStatus.FAILED, detail=f"{type(error).__name__}: {error}")
        if not gathered:
            self._publish(round_id, "", ok=False, digest="")
            return AveragingResult(RoundStatus.FAILED, detail="the all-reduce returned no group")

        members = {str(peer): data for peer, data in gathered.items()}
        group = records.group_id(sorted(members))
        mismatched = sorted(d["uid"] for d in members.values() if d.get("round") != round_id or d.get("outer") != outer)
        with self._averager.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        digest = tensors_digest(averaged)
        ok = not mismatched
        self._publish(round_id, group, ok=ok, digest=digest)
        if mismatched:
            return AveragingResult(
                RoundStatus.FAILED, group_size=len(members), detail=f"replicas at another round or θ₀: {mismatched}"
            )
        problem = self._verify(round_id, group, members, digest, started, timeout)
        if problem:
            return AveragingResult(RoundStatus.FAILED, group_size=len(members), detail=problem)
        return AveragingResult(RoundStatus.AVERAGED, averaged, group_size=len(members))

    def _publish(self, round_id: int, group: str, ok: bool, digest: str) -> None:
        outcome = records.RoundOutcome(
            peer_id=self.dht.peer_id.to_base58(), uid=self.uid, round=round_id, group=group, ok=ok, digest=digest
        )
        try:
            records.publish_round_outcome(self.dht, self.experiment_prefix, self.stage, outcome, self.dht_timeout)
        except SwarmError as error:
            logger.warning("could not publish the outcome of round %d: %s", round_id, error)

    def _verify(
        self, round_id: int, group: str, members: dict[str, Any], digest: str, started: float, timeout: float
    ) -> str | None:
        """None when every member reported the same result for this group; else what went wrong."""
        deadline = time.monotonic() + max(timeout - (time.time() - started), 2 * self.matchmaking_time)
        while True:
            try:
                outcomes = records.fetch_round_outcomes(self.dht, self.experiment_prefix, self.stage, self.dht_timeout)
            except SwarmError as error:
                outcomes, fetch_error = {}, str(error)
            else:
                fetch_error = ""
            waiting = []
            for peer, data in members.items():
                outcome = outcomes.get(peer)
                if outcome is None or outcome.round != round_id or outcome.updated_at < started - 1.0:
                    waiting.append(data["uid"])
                elif not outcome.ok:
                    return f"{outcome.uid} could not complete the round"
                elif outcome.group != group:
                    waiting.append(data["uid"])  # an older attempt at this round, or another group
                elif outcome.digest != digest:
                    return f"{outcome.uid} ended with another result (digest {outcome.digest[:8]} vs {digest[:8]})"
            if not waiting:
                return None
            if time.monotonic() > deadline:
                return f"no verified result from {', '.join(waiting)}{' (' + fetch_error + ')' if fetch_error else ''}"
            time.sleep(VERIFY_POLL_S)

    def load_state(self, timeout: float) -> tuple[Any, list[torch.Tensor]] | None:
        """The state of the most advanced live replica of this stage, or None if none could give it."""
        try:
            return self._averager.load_state_from_peers(wait=True, timeout=timeout)
        except Exception as error:  # timeouts and hivemind's own errors
            logger.warning("could not download the stage's state: %s", error)
            return None

    def shutdown(self) -> None:
        self._averager.shutdown()
