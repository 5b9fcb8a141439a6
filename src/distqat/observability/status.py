"""`distqat status --initial-peers ADDR [--json]`: the live view's tables, printed once, from any machine.

It joins the swarm as a client-mode DHT node (it serves nothing and stores nothing), reads the servers'
and trainers' records under the config's `experiment_prefix` and stages, prints them and leaves. Every
step is bounded by `--timeout`: an unreachable swarm is one error line, never a hang.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console

from distqat.config import Config
from distqat.errors import ConfigError, SwarmError
from distqat.observability.fleet import fleet_snapshot
from distqat.observability.render import fleet_view
from distqat.swarm import records
from distqat.swarm.node import start_dht


def read_fleet(config: Config, timeout: float) -> dict[str, Any]:
    if not config.network.initial_peers:
        raise ConfigError(
            "network.initial_peers: status needs the swarm's address (--initial-peers, "
            "see initial_peers.txt in the coordinator's log dir)"
        )
    stage_names = config.model_pipeline.stage_names
    dht = start_dht(config.network, client_mode=True, timeout=timeout)
    try:
        dht_timeout = min(config.network.dht_timeout, timeout)
        replicas = records.fetch_replicas(dht, config.experiment_prefix, stage_names, dht_timeout)
        trainers = records.fetch_trainer_metrics(dht, config.experiment_prefix, dht_timeout)
    finally:
        dht.shutdown()
    fleet = fleet_snapshot(trainers, replicas, stage_names, time.time(), config.monitor.straggler_ratio)
    fleet["experiment_prefix"] = config.experiment_prefix
    return fleet


def print_status(config: Config, as_json: bool, timeout: float, console: Console) -> dict[str, Any]:
    try:
        fleet = read_fleet(config, timeout)
    except SwarmError as error:
        raise SwarmError(f"cannot read the swarm '{config.experiment_prefix}': {error}") from None
    if as_json:
        sys.stdout.write(json.dumps(fleet, indent=2) + "\n")
    else:
        console.print(f"swarm '{config.experiment_prefix}'")
        console.print(fleet_view(fleet))
    return fleet
