"""Synthetic DHT records for the observability tests (a helper module, not a test file)."""

from __future__ import annotations

from distqat.swarm.records import ServerInfo, TrainerMetrics

NOW = 1000.0
STAGES = ["head", "body", "tail"]


def replica(stage: str, index: int, rate: float, fwd: float = 10.0, bwd: float = 20.0, **extra) -> ServerInfo:
    return ServerInfo(
        uid=f"{stage}.0.0.{index}",
        peer_id=f"12D3KooPeer{stage}{index}xxxxxxxx",
        maddrs=[],
        stage=stage,
        stage_index=STAGES.index(stage),
        expert_index=index,
        device="cpu",
        samples_per_s=rate,
        forward_ms=fwd,
        backward_ms=bwd,
        updated_at=NOW - 1,
        **extra,
    )


def trainer(name: str, step: int, rate: float, updated_at: float = NOW - 1, **extra) -> TrainerMetrics:
    return TrainerMetrics(
        trainer_id=name,
        peer_id=f"12D3KooTrainer{name}",
        step=step,
        samples=32 * step,
        loss=1.0,
        loss_avg=extra.pop("loss_avg", 1.0),
        first_loss_avg=2.0,
        samples_per_s=rate,
        train_time_s=10.0,
        first_step_at=NOW - 10,
        updated_at=updated_at,
        **extra,
    )
