"""DistilGPT2 (family `distilgpt2`): a 6-layer GPT-2 built from `transformers`' GPT2Block and GPT2Config.

768 hidden, 12 heads, 1024 positions, the GPT-2 BPE vocabulary of 50,257 tokens; 120.5M parameters with
the untied LM head (see `causal_lm`). `architecture` overrides any of the GPT2Config fields below, e.g.
`{n_layer: 2, n_embd: 64, n_head: 2}` for a reduced variant. `pretrained_path`: a local folder written by
`GPT2LMHeadModel.save_pretrained` (e.g. a download of `distilbert/distilgpt2`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from distqat.models.causal_lm import CausalLMFamily, gpt2_residual_std
from distqat.models.registry import register_family


class DistilGPT2Family(CausalLMFamily):
    name = "distilgpt2"
    model_type = "gpt2"
    lm_class = GPT2LMHeadModel
    architecture_keys = frozenset(
        {
            "n_layer",
            "n_embd",
            "n_head",
            "n_inner",
            "n_positions",
            "vocab_size",
            "activation_function",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "layer_norm_epsilon",
            "initializer_range",
        }
    )

    def base_config(self) -> dict[str, Any]:
        return {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}

    def make_config(self, fields: dict[str, Any]) -> GPT2Config:
        return GPT2Config(**fields)

    def make_block(self, config: GPT2Config, index: int) -> nn.Module:
        return GPT2Block(config, layer_idx=index)

    def layer_count(self, config: GPT2Config) -> int:
        return config.n_layer

    def residual_std(self, config: GPT2Config) -> float | None:
        return gpt2_residual_std(config.initializer_range, config.n_layer)


DISTILGPT2 = register_family(DistilGPT2Family())
