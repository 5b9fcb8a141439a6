"""Reduced variants of the built-in families: the same code at a width that trains in seconds on a CPU.

Use one as `model_pipeline.architecture` (e.g. for a smoke run of a config), as the tests and
`benchmarks/model_steps.py` do. Keys are the families' `architecture` fields.
"""

from __future__ import annotations

from typing import Any

REDUCED: dict[str, dict[str, Any]] = {
    "resnet18": {"blocks": [1, 1, 1, 1]},
    "resnet50": {"blocks": [1, 1, 1, 1], "width_per_group": 16},
    "resnet101": {"blocks": [1, 1, 2, 1], "width_per_group": 16},
    "distilgpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512},
    "gptneo": {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "vocab_size": 512, "window_size": 8},
    "wav2vec2": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "conv_dim": [32, 32, 32],
        "conv_stride": [5, 4, 4],
        "conv_kernel": [10, 8, 4],
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "classifier_proj_size": 32,
    },
}
