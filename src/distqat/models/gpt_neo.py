"""GPT-Neo-125M (family `gptneo`): built from `transformers`' GPTNeoBlock and GPTNeoConfig.

12 layers alternating global and local (256-token window) attention, 768 hidden, 12 heads, 2048
positions, the GPT-2 BPE vocabulary; 163.8M parameters with the untied LM head (125.2M tied, see
`causal_lm`). Each block applies its own causal (and, for local layers, sliding-window) mask.
`architecture` overrides the GPTNeoConfig fields below; changing `num_layers` alone keeps the
global/local alternation. `pretrained_path`: a folder written by `GPTNeoForCausalLM.save_pretrained`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GPTNeoConfig, GPTNeoForCausalLM
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoBlock

from distqat.models.causal_lm import CausalLMFamily
from distqat.models.registry import register_family


def alternating_attention(layers: int) -> list:
    """GPT-Neo's attention_types for `layers` blocks: global, local, global, ..."""
    types: list = [[["global", "local"], layers // 2]] if layers >= 2 else []
    if layers % 2:
        types.append([["global"], 1])
    return types


class GPTNeoFamily(CausalLMFamily):
    name = "gptneo"
    model_type = "gpt_neo"
    lm_class = GPTNeoForCausalLM
    attn_implementation = "eager"
    architecture_keys = frozenset(
        {
            "num_layers",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "vocab_size",
            "window_size",
            "attention_types",
            "activation_function",
            "resid_dropout",
            "embed_dropout",
            "attention_dropout",
            "layer_norm_epsilon",
            "initializer_range",
        }
    )

    def base_config(self) -> dict[str, Any]:
        return {
            "num_layers": 12,
            "hidden_size": 768,
            "num_heads": 12,
            "max_position_embeddings": 2048,
            "vocab_size": 50257,
            "window_size": 256,
        }

    def make_config(self, fields: dict[str, Any]) -> GPTNeoConfig:
        fields = dict(fields)
        fields.setdefault("attention_types", alternating_attention(fields["num_layers"]))
        return GPTNeoConfig(**fields)

    def make_block(self, config: GPTNeoConfig, index: int) -> nn.Module:
        return GPTNeoBlock(config, layer_id=index)

    def layer_count(self, config: GPTNeoConfig) -> int:
        return config.num_layers

    def embedding_dropout(self, config: GPTNeoConfig) -> float:
        return float(config.embed_dropout)


GPTNEO = register_family(GPTNeoFamily())
