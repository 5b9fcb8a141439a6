"""Wav2Vec2 (family `wav2vec2`) from `transformers`, with an utterance-classification head.

Units: `feature_encoder` (the convolutional feature encoder, feature projection and convolutional position
embedding), one unit per transformer layer, and `classifier` (projection, mean over frames, class logits:
`Wav2Vec2ForSequenceClassification`'s head). Input: a 16 kHz waveform [B, T]; output: logits [B, classes].
Wav2Vec2-base by default (12 layers, 768 hidden, 94.6M parameters with the head). `architecture`
overrides the Wav2Vec2Config fields below; `pretrained_path` loads a folder written by `save_pretrained`
(e.g. a download of `facebook/wav2vec2-base`; a classification head missing from it starts random).

Training differs from `transformers`' own loop in two ways: no LayerDrop and no SpecAugment time masking.
Both were chosen when a server recomputed a stage's forward for its backward, which random layer drops
and masks would have made inexact; servers now keep the forward's graph (weight stashing,
`distributed/replica.py`), so the two could come back, which would be a change of the model's training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

from distqat.errors import ModelError
from distqat.models.family import BuildContext, UnitFamily, seeded
from distqat.models.hf_loading import from_pretrained, pretrained_config
from distqat.models.registry import register_family

SAMPLE_RATE = 16_000
SAMPLE_SECONDS = 1.0  # length of the dry run's sample waveform when the data config names none


class FeatureEncoder(nn.Module):
    def __init__(self, model: Wav2Vec2ForSequenceClassification):
        super().__init__()
        base = model.wav2vec2
        self.stable_layer_norm = model.config.do_stable_layer_norm
        self.feature_extractor, self.feature_projection = base.feature_extractor, base.feature_projection
        self.pos_conv_embed = base.encoder.pos_conv_embed
        # post-LN (base) normalises before the layers; stable-LN (large) after them, in the classifier unit
        self.layer_norm = nn.Identity() if self.stable_layer_norm else base.encoder.layer_norm
        self.dropout = base.encoder.dropout

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(waveform).transpose(1, 2)
        hidden, _ = self.feature_projection(features)
        hidden = hidden + self.pos_conv_embed(hidden)
        return self.dropout(self.layer_norm(hidden))


class EncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = self.layer(hidden)
        return output[0] if isinstance(output, tuple) else output


class Classifier(nn.Module):
    def __init__(self, model: Wav2Vec2ForSequenceClassification):
        super().__init__()
        encoder = model.wav2vec2.encoder
        self.layer_norm = encoder.layer_norm if model.config.do_stable_layer_norm else nn.Identity()
        self.projector, self.classifier = model.projector, model.classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projector(self.layer_norm(hidden)).mean(dim=1))


class Wav2Vec2Family(UnitFamily):
    name = "wav2vec2"
    architecture_keys = frozenset(
        {
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "conv_dim",
            "conv_stride",
            "conv_kernel",
            "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups",
            "classifier_proj_size",
            "feat_extract_norm",
            "do_stable_layer_norm",
            "hidden_dropout",
            "attention_dropout",
            "activation_dropout",
            "feat_proj_dropout",
            "initializer_range",
        }
    )

    def config(self, context: BuildContext) -> Wav2Vec2Config:
        if context.pretrained_path:
            if context.architecture:
                raise ModelError(
                    "model_pipeline.architecture: not allowed with pretrained_path (its config.json rules)"
                )
            config = pretrained_config(context.pretrained_path, "wav2vec2")
        else:
            self.check_architecture(context)
            fields: dict[str, Any] = dict(context.architecture)
            config = Wav2Vec2Config(**fields)
        config.num_labels = context.num_classes
        config.layerdrop = 0.0
        config.mask_time_prob = 0.0
        config.apply_spec_augment = False
        return config

    def unit_names(self, context: BuildContext) -> list[str]:
        layers = self.config(context).num_hidden_layers
        return ["feature_encoder", *(f"layer.{i}" for i in range(layers)), "classifier"]

    def default_cuts(self, context: BuildContext, num_stages: int) -> list[int]:
        # The feature encoder in the head and the classifier in the tail, the layers spread evenly (with two
        # stages, each takes half of them).
        layers = self.config(context).num_hidden_layers
        if num_stages == 2:
            return [1 + layers // 2]
        bodies = num_stages - 2
        if bodies > layers:
            raise ModelError(f"wav2vec2 has {layers} layers: it cannot fill {bodies} body stages")
        return [1 + round(layers * i / bodies) for i in range(bodies)] + [1 + layers]

    def _model(self, context: BuildContext) -> Wav2Vec2ForSequenceClassification:
        config = self.config(context)
        if context.pretrained_path:
            return from_pretrained(
                Wav2Vec2ForSequenceClassification,
                str(Path(context.pretrained_path)),
                config=config,
            )
        return Wav2Vec2ForSequenceClassification(config)

    def build_units(self, context: BuildContext, start: int, end: int) -> list[nn.Module]:
        # transformers initialises the whole model at once (its own init scheme); one seed for all of it keeps a
        # unit's weights the same whichever stage it lands in.
        model = seeded(context.seed, self.name, 0, lambda: self._model(context))
        units: list[nn.Module] = [
            FeatureEncoder(model),
            *(EncoderLayer(layer) for layer in model.wav2vec2.encoder.layers),
            Classifier(model),
        ]
        return units[start:end]

    def sample_input(self, batch_size: int, context: BuildContext) -> torch.Tensor:
        # the data config's utterance length where it has one (`data.audio_len`), else one second
        samples = getattr(context.data, "audio_len", None) or int(SAMPLE_RATE * SAMPLE_SECONDS)
        return torch.randn(batch_size, samples)


WAV2VEC2 = register_family(Wav2Vec2Family())
