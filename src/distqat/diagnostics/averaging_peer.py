"""One stage replica's averaging, alone in a process: for tests, benchmarks and checking a link by hand.

`python -m distqat.diagnostics.averaging_peer --mode round ...` runs one DiLoCo round through the real
hivemind averager: every peer starts from the same θ₀ (seeded), moves its params by its own seeded
offset (standing in for its inner steps), touches `<out>.ready`, waits for the `--go` file, runs the
round and writes what it ended with to `--out` (a torch file: status, group size, params, θ₀ digest,
bytes sent and received).

`--mode donor --stage-model NAME` builds a registered stage with a trained-looking state (one inner
step, one DiLoCo round) and shares it until `--go` appears; `--mode joiner --stage-model NAME` downloads
it the way a joining server does and writes the seconds and bytes it took to `--out`.

Without `--initial-peers` the peer bootstraps the DHT and writes its address to `--maddrs-file`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from distqat.config import DataConfig, NetworkConfig, OptimConfig, StageConfig
from distqat.distributed.optim.diloco import AveragingResult, DiLoCo, PresetAverager, RoundStatus
from distqat.distributed.stage_sync import pack_state, unpack_state
from distqat.swarm.averaging import StageAverager
from distqat.swarm.node import start_dht, visible_maddrs

NESTEROV = OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9, sgd_nesterov=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["round", "donor", "joiner"], default="round")
    parser.add_argument("--initial-peers", default="")
    parser.add_argument("--maddrs-file", type=Path)
    parser.add_argument("--uid", required=True)
    parser.add_argument("--stage", default="body")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight", type=int, default=1)
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--stage-model", default="resnet18.head", help="donor/joiner: a registered stage")
    parser.add_argument("--compression", default="none", choices=["none", "fp16", "int8"])
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    return parser.parse_args(argv)


def seeded_replica(numel: int, seed: int, weight: int) -> DiLoCo:
    torch.manual_seed(0)  # the same θ₀ everywhere
    params = [torch.nn.Parameter(torch.randn(numel)), torch.nn.Parameter(torch.randn(3, 5))]
    diloco = DiLoCo(params, NESTEROV)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator), alpha=0.1)
    diloco.record_inner_step(weight)
    return diloco


def stage_replica(model_name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, DiLoCo]:
    """A stage with a full state: Adam moments after one step, DiLoCo momentum after one round."""
    from distqat.models import build_stage, get_stage_entry

    module = build_stage(StageConfig(model_name=model_name), DataConfig(), seed=0)
    optimizer = torch.optim.Adam(module.parameters())
    sample = get_stage_entry(model_name).sample_input_fn(4, DataConfig())
    module(sample).float().square().mean().backward()
    optimizer.step()
    diloco = DiLoCo(list(module.parameters()), NESTEROV)
    diloco.record_inner_step(4)
    diloco.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=0)
    return module, optimizer, diloco


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"{args.uid} %(levelname)s %(message)s")
    if args.mode == "round":
        diloco, module, optimizer = seeded_replica(args.numel, args.seed, args.weight), None, None
    else:
        module, optimizer, diloco = stage_replica(args.stage_model)

    network = NetworkConfig(initial_peers=[p for p in args.initial_peers.split(",") if p])
    dht = start_dht(network)
    averager = None
    try:
        if args.maddrs_file is not None:
            args.maddrs_file.write_text(",".join(visible_maddrs(dht)))

        def shared_state():
            if module is None:
                return {}, []
            return pack_state(module, optimizer, diloco, args.stage, args.uid)

        averager = StageAverager(
            dht,
            experiment_prefix="diagnostics",
            stage=args.stage,
            uid=args.uid,
            templates=diloco.params,
            compression=args.compression,
            matchmaking_time=args.matchmaking_time,
            request_timeout=args.matchmaking_time / 2,
            dht_timeout=5.0,
            outer_digest=diloco.outer_digest,
            allreduce_timeout=args.timeout,
            state_provider=shared_state,
        )
        averager.set_priority(1.0 if args.mode == "donor" else 0.0)
        args.out.with_suffix(".ready").touch()
        wait_for(args.go)
        if args.mode == "round":
            started = time.monotonic()
            report = diloco.run_round(averager, timeout=args.timeout)
            logging.info("round %s in %.2f s: %s", report.status.value, time.monotonic() - started, report.detail)
            result = {
                "status": report.status.value,
                "group_size": report.group_size,
                "detail": report.detail,
                "params": [p.detach().clone() for p in diloco.params],
                "outer_digest": diloco.outer_digest(),
                "bytes_sent": averager.bytes_sent,
                "bytes_received": averager.bytes_received,
            }
        elif args.mode == "joiner":
            started = time.monotonic()
            downloaded = averager.load_state(timeout=args.timeout)
            seconds = time.monotonic() - started
            if downloaded is None:
                raise SystemExit(f"{args.uid}: no peer gave its state")
            problem = unpack_state(*downloaded, module, optimizer, diloco, args.stage)
            if problem:
                raise SystemExit(f"{args.uid}: {problem}")
            result = {"seconds": seconds, "bytes": int(downloaded[1][0].numel()), "round": diloco.round}
        else:
            result = {}
        torch.save(result, args.out)
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
