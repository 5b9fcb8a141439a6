"""What the GPT families (DistilGPT2, GPT-Neo) share: units built from `transformers`' own blocks and configs.

Units: `embeddings` (token + position embeddings, dropout), one unit per transformer block, and `lm_head`
(final layer norm and the vocabulary projection). The input is token ids [B, T]; the output is logits
[B, T, vocab] for the causal LM loss (labels come already shifted from the data side). The LM head is a
separate matrix from the token embedding (untied): head and tail live on different servers, so the usual
tied weights would need a gradient exchange between them. Hence a 6-layer GPT-2 has 120.5M parameters
here, not the 81.9M of the tied original. A pretrained model's embedding is copied into both.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from distqat.errors import ModelError
from distqat.models.family import BuildContext, UnitFamily, seeded
from distqat.models.hf_loading import from_pretrained, pretrained_config


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, hidden: int, dropout: float):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden)
        self.wpe = nn.Embedding(max_positions, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.wpe.num_embeddings:
            raise ModelError(f"sequences of {input_ids.shape[-1]} tokens exceed {self.wpe.num_embeddings} positions")
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions))


class Block(nn.Module):
    """One transformers block, called on hidden states alone (its causal mask is its own, see the families)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = self.block(hidden)
        return output[0] if isinstance(output, tuple) else output


class LMHead(nn.Module):
    def __init__(self, hidden: int, vocab_size: int, eps: float):
        super().__init__()
        self.ln_f = nn.LayerNorm(hidden, eps=eps)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def init_gpt_weights(module: nn.Module, std: float, residual_std: float | None = None) -> None:
    """GPT-style init: normal(0, std) weights, zero biases, unit norms; residual projections (`c_proj`) get
    `residual_std` (GPT-2 scales them by 1/sqrt(2 * layers))."""
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
            continue
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            nn.init.normal_(weight, 0.0, residual_std if residual_std and name.endswith("c_proj") else std)
        bias = getattr(sub, "bias", None)
        if isinstance(bias, nn.Parameter):
            nn.init.zeros_(bias)


class CausalLMFamily(UnitFamily):
    """A GPT family: subclasses name the transformers classes and config fields."""

    model_type: str
    lm_class: type[PreTrainedModel]
    # GPT-2's eager attention applies no causal mask unless given one; its sdpa path masks causally by
    # itself. GPT-Neo's attention (eager) keeps its own causal and sliding-window masks.
    attn_implementation = "sdpa"

    @abstractmethod
    def base_config(self) -> dict[str, Any]:
        """The published model's architecture."""

    @abstractmethod
    def make_config(self, fields: dict[str, Any]) -> PretrainedConfig: ...

    @abstractmethod
    def make_block(self, config: PretrainedConfig, index: int) -> nn.Module: ...

    @abstractmethod
    def layer_count(self, config: PretrainedConfig) -> int: ...

    def config(self, context: BuildContext) -> PretrainedConfig:
        if context.pretrained_path:
            if context.architecture:
                raise ModelError(
                    "model_pipeline.architecture: not allowed with pretrained_path (its config.json rules)"
                )
            return pretrained_config(context.pretrained_path, self.model_type)
        self.check_architecture(context)
        fields = {**self.base_config(), **context.architecture}
        # GPT-2's end-of-text id (50256) must stay inside a reduced vocabulary
        fields.setdefault("bos_token_id", min(50256, int(fields["vocab_size"]) - 1))
        fields.setdefault("eos_token_id", fields["bos_token_id"])
        config = self.make_config(fields)
        config._attn_implementation = self.attn_implementation
        return config

    def unit_names(self, context: BuildContext) -> list[str]:
        layers = self.layer_count(self.config(context))
        return ["embeddings", *(f"block.{i}" for i in range(layers)), "lm_head"]

    def default_cuts(self, context: BuildContext, num_stages: int) -> list[int]:
        # Embeddings in the head, final norm + LM head in the tail, blocks spread evenly: with 2 stages the
        # head gets the first half of the blocks, with 3 or more the head and tail get none.
        layers = self.layer_count(self.config(context))
        if num_stages == 2:
            return [1 + layers // 2]
        bodies = num_stages - 2
        if bodies > layers:
            raise ModelError(f"{self.name} has {layers} blocks: it cannot fill {bodies} body stages")
        return [1 + round(layers * i / bodies) for i in range(bodies)] + [1 + layers]

    def build_units(self, context: BuildContext, start: int, end: int) -> list[nn.Module]:
        config = self.config(context)
        layers = self.layer_count(config)
        if context.pretrained_path:
            return self._pretrained_units(context.pretrained_path, layers, start, end)
        hidden, std = config.hidden_size, config.initializer_range
        units: list[nn.Module] = []
        for index in range(start, end):
            if index == 0:
                unit: nn.Module = Embeddings(
                    config.vocab_size, config.max_position_embeddings, hidden, self.embedding_dropout(config)
                )
            elif index <= layers:
                unit = Block(self.make_block(config, index - 1))
            else:
                unit = LMHead(hidden, config.vocab_size, config.layer_norm_epsilon)
            seeded(context.seed, self.name, index, lambda u=unit: init_gpt_weights(u, std, self.residual_std(config)))
            units.append(unit)
        return units

    def embedding_dropout(self, config: PretrainedConfig) -> float:
        return float(config.embd_pdrop)

    def residual_std(self, config: PretrainedConfig) -> float | None:
        return None

    def _pretrained_units(self, path: str, layers: int, start: int, end: int) -> list[nn.Module]:
        model = from_pretrained(self.lm_class, path, attn_implementation=self.attn_implementation)
        base = model.base_model
        config = model.config
        units: list[nn.Module] = []
        for index in range(start, end):
            if index == 0:
                unit: nn.Module = Embeddings(
                    config.vocab_size,
                    config.max_position_embeddings,
                    config.hidden_size,
                    self.embedding_dropout(config),
                )
                unit.wte, unit.wpe = base.wte, base.wpe
            elif index <= layers:
                unit = Block(base.h[index - 1])
            else:
                unit = LMHead(config.hidden_size, config.vocab_size, config.layer_norm_epsilon)
                unit.ln_f = base.ln_f
                # untie: the tail owns its own copy of the (possibly tied) output matrix
                unit.lm_head.weight = nn.Parameter(model.get_output_embeddings().weight.detach().clone())
            units.append(unit)
        return units

    def sample_input(self, batch_size: int, context: BuildContext) -> torch.Tensor:
        return torch.randint(0, self.config(context).vocab_size, (batch_size, context.data.seq_len))


def gpt2_residual_std(std: float, layers: int) -> float:
    return std / math.sqrt(2 * layers)
