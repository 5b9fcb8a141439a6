"""One replica of a stage for the averaging tests: a real DHT node, a real StageAverager, one DiLoCo round.

Every peer starts from the same θ₀ (seeded), moves its params by its own seeded offset (standing in for
its inner steps), touches `<out>.ready`, waits for the test's `go` file, runs one round and writes what it
ended with to `--out` (a torch file: status, group size, params, θ₀ digest, bytes). Without
`--initial-peers` it bootstraps the DHT and writes its address to `--maddrs-file`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from distqat.config import NetworkConfig, OptimConfig
from distqat.distributed.optim.diloco import DiLoCo
from distqat.swarm.averaging import StageAverager
from distqat.swarm.node import start_dht, visible_maddrs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", default="")
    parser.add_argument("--maddrs-file", type=Path)
    parser.add_argument("--uid", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--weight", type=int, required=True)
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--stage", default="body")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"{args.uid} %(levelname)s %(message)s")

    torch.manual_seed(0)  # the same θ₀ everywhere
    params = [torch.nn.Parameter(torch.randn(args.numel)), torch.nn.Parameter(torch.randn(3, 5))]
    outer = OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9, sgd_nesterov=True)
    diloco = DiLoCo(params, outer)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator), alpha=0.1)
    diloco.record_inner_step(args.weight)

    network = NetworkConfig(initial_peers=[p for p in args.initial_peers.split(",") if p])
    dht = start_dht(network)
    averager = None
    try:
        if args.maddrs_file is not None:
            args.maddrs_file.write_text(",".join(visible_maddrs(dht)))
        averager = StageAverager(
            dht,
            experiment_prefix="test",
            stage=args.stage,
            uid=args.uid,
            templates=params,
            compression=args.compression,
            matchmaking_time=args.matchmaking_time,
            request_timeout=args.matchmaking_time / 2,
            dht_timeout=5.0,
            outer_digest=diloco.outer_digest,
            allreduce_timeout=args.timeout,
            state_provider=lambda: ({}, []),
        )
        args.out.with_suffix(".ready").touch()
        while not args.go.exists():
            time.sleep(0.05)
        started = time.monotonic()
        report = diloco.run_round(averager, timeout=args.timeout)
        logging.info("round %s in %.2f s: %s", report.status.value, time.monotonic() - started, report.detail)
        torch.save(
            {
                "status": report.status.value,
                "group_size": report.group_size,
                "detail": report.detail,
                "params": [p.detach().clone() for p in params],
                "outer_digest": diloco.outer_digest(),
                "bytes_sent": averager.bytes_sent,
                "bytes_received": averager.bytes_received,
            },
            args.out,
        )
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
