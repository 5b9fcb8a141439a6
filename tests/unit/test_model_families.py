"""Built-in families: published parameter counts, stages that add up to and chain into the full model,
outputs equal to `transformers`' own models, and weights loaded from a local Hugging Face folder."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from distqat.config import DataConfig, ModelPipelineConfig, StageConfig
from distqat.errors import ModelError
from distqat.models import build_pipeline_stages, build_stage, get_stage_entry, stage_ranges
from distqat.models.family import BuildContext
from distqat.sharding import unit_param_counts

IMAGENET = DataConfig(num_channels=3, img_size=224)
TINY_GPT2 = {"n_layer": 3, "n_embd": 32, "n_head": 2, "vocab_size": 97, "n_positions": 64}
TINY_NEO = {"num_layers": 3, "hidden_size": 32, "num_heads": 2, "vocab_size": 97, "window_size": 4}
TINY_W2V = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16, 16],
    "conv_stride": [5, 2],
    "conv_kernel": [10, 3],
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 2,
    "classifier_proj_size": 16,
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def chain(stages: list[torch.nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    hidden = inputs
    for stage in stages:
        hidden = stage.eval()(hidden)
    return hidden


def pipeline(family: str, roles: list[str], **fields) -> ModelPipelineConfig:
    stages = [{"model_name": f"{family}.{role}", "name": f"{role}{i}"} for i, role in enumerate(roles)]
    return ModelPipelineConfig(pipeline=stages, **fields)


def test_resnets_have_torchvisions_parameter_counts() -> None:
    # ImageNet shape (224x224x3, 1000 classes) gives torchvision's own stem and its published counts.
    full = build_stage(StageConfig(model_name="resnet18.full", num_classes=1000), IMAGENET, seed=0)
    assert count(full) == 11_689_512
    for family, published in (("resnet50", 25_557_032), ("resnet101", 44_549_160)):
        entry = get_stage_entry(f"{family}.full")
        assert sum(unit_param_counts(entry.family, BuildContext(num_classes=1000, data=IMAGENET))) == published


@pytest.mark.parametrize(
    ("family", "untied", "tied_published"),
    [("distilgpt2", 120_509_952, 81.9e6), ("gptneo", 163_795_968, 125.2e6)],
)
def test_gpt_families_count_and_untied_head(family: str, untied: int, tied_published: float) -> None:
    entry = get_stage_entry(f"{family}.full")
    counts = unit_param_counts(entry.family, BuildContext(data=DataConfig(seq_len=128)))
    assert sum(counts) == untied
    embedding = 50257 * 768  # the untied LM head's extra matrix
    assert abs(sum(counts) - embedding - tied_published) < 0.05e6


def test_wav2vec2_base_count() -> None:
    entry = get_stage_entry("wav2vec2.full")
    total = sum(unit_param_counts(entry.family, BuildContext(num_classes=10)))
    classifier = 768 * 256 + 256 + 256 * 10 + 10
    assert abs(total - classifier - 94.4e6) < 0.1e6


@pytest.mark.parametrize(
    ("family", "architecture", "data", "roles"),
    [
        ("resnet18", {}, DataConfig(num_channels=1, img_size=16), ["head", "body", "tail"]),
        ("resnet50", {"blocks": [1, 1, 1, 1]}, DataConfig(num_channels=3, img_size=16), ["head", "tail"]),
        ("distilgpt2", TINY_GPT2, DataConfig(seq_len=12), ["head", "body", "body", "tail"]),
        ("gptneo", TINY_NEO, DataConfig(seq_len=12), ["head", "body", "tail"]),
        ("wav2vec2", TINY_W2V, DataConfig(), ["head", "tail"]),
    ],
)
def test_chained_stages_equal_the_full_model(family, architecture, data, roles) -> None:
    split = pipeline(family, roles, architecture=architecture)
    full = build_pipeline_stages(pipeline(family, ["full"], architecture=architecture), data, seed=3)[0]
    stages = build_pipeline_stages(split, data, seed=3)
    assert sum(count(stage) for stage in stages) == count(full)
    spans = stage_ranges(split, data)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    context = BuildContext(data=data, architecture=architecture)
    inputs = get_stage_entry(f"{family}.full").family.sample_input(2, context)
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, inputs), full.eval()(inputs), rtol=1e-5, atol=1e-5)


def _copy_gpt_weights(stages: list[torch.nn.Module], reference) -> None:
    """Put a transformers model's weights into our full-model units (same names, untied LM head)."""
    units = [unit for stage in stages for unit in stage]
    base = reference.base_model
    units[0].wte.load_state_dict(base.wte.state_dict())
    units[0].wpe.load_state_dict(base.wpe.state_dict())
    for index, block in enumerate(base.h):
        units[1 + index].block.load_state_dict(block.state_dict())
    units[-1].ln_f.load_state_dict(base.ln_f.state_dict())
    units[-1].lm_head.weight.data.copy_(reference.lm_head.weight)


@pytest.mark.parametrize("family", ["distilgpt2", "gptneo"])
def test_gpt_stages_compute_what_transformers_computes(family: str) -> None:
    """Causal (and GPT-Neo's local, window 4 < 12 tokens) masking survives calling blocks one by one."""
    from transformers import GPT2LMHeadModel, GPTNeoForCausalLM

    architecture = TINY_GPT2 if family == "distilgpt2" else TINY_NEO
    data = DataConfig(seq_len=12)
    entry = get_stage_entry(f"{family}.full")
    context = BuildContext(data=data, architecture=architecture)
    model_class = GPT2LMHeadModel if family == "distilgpt2" else GPTNeoForCausalLM
    reference = model_class(entry.family.config(context)).eval()
    stages = build_pipeline_stages(pipeline(family, ["head", "tail"], architecture=architecture), data, seed=0)
    _copy_gpt_weights(stages, reference)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)


def test_pretrained_gpt2_folder_loads_into_the_stages(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    reference = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()  # tied LM head, as the published weights
    reference.save_pretrained(tmp_path / "gpt2")
    split = pipeline("distilgpt2", ["head", "body", "tail"], pretrained_path=str(tmp_path / "gpt2"))
    stages = build_pipeline_stages(split, DataConfig(seq_len=10), seed=0)
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)
    # the tail owns a copy of the tied matrix: training the head's embedding does not move it
    assert stages[-1][-1].lm_head.weight.data_ptr() != stages[0][0].wte.weight.data_ptr()


def test_pretrained_wav2vec2_folder_loads_into_the_stages(tmp_path: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(7)
    config = Wav2Vec2Config(**TINY_W2V, num_labels=4, layerdrop=0.0, mask_time_prob=0.0)
    reference = Wav2Vec2ForSequenceClassification(config).eval()
    reference.save_pretrained(tmp_path / "w2v")
    split = ModelPipelineConfig(
        pipeline=[
            {"model_name": "wav2vec2.head", "num_classes": 4},
            {"model_name": "wav2vec2.tail", "num_classes": 4},
        ],
        pretrained_path=str(tmp_path / "w2v"),
    )
    stages = build_pipeline_stages(split, DataConfig(), seed=0)
    waveform = torch.randn(2, 4000)
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, waveform), reference(waveform).logits, rtol=1e-4, atol=1e-5)


def test_pretrained_path_errors_name_the_folder(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ModelError, match=r"pretrained_path: .*nowhere: no config.json"):
        stage_ranges(pipeline("distilgpt2", ["full"], pretrained_path=str(tmp_path / "nowhere")), DataConfig())
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match=r"holds a 'gpt2' model, not 'gpt_neo'"):
        stage_ranges(pipeline("gptneo", ["full"], pretrained_path=str(tmp_path / "gpt2")), DataConfig())
    with pytest.raises(ModelError, match="architecture: not allowed with pretrained_path"):
        stage_ranges(
            pipeline("distilgpt2", ["full"], pretrained_path=str(tmp_path / "gpt2"), architecture={"n_layer": 2}),
            DataConfig(),
        )


def test_resnet_state_dict_file_loads(tmp_path: Path) -> None:
    data = DataConfig(num_channels=3, img_size=32)
    source = build_stage(StageConfig(model_name="resnet18.full"), data, seed=5)
    from safetensors.torch import save_file

    state = {f"{k}": v for k, v in _torchvision_state(source).items()}
    save_file(state, str(tmp_path / "r18.safetensors"))
    split = pipeline("resnet18", ["head", "tail"], pretrained_path=str(tmp_path / "r18.safetensors"))
    stages = build_pipeline_stages(split, data, seed=99)  # another seed: the weights come from the file
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(chain(stages, images), source.eval()(images))
    broken = pipeline("resnet50", ["full"], pretrained_path=str(tmp_path / "r18.safetensors"))
    with pytest.raises(ModelError, match=r"pretrained_path: .*r18.safetensors: cannot load"):
        build_pipeline_stages(broken, data, seed=0)


def _torchvision_state(full: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our resnet18.full units back under torchvision's parameter names."""
    stem, *blocks, classifier = list(full)
    state = {f"conv1.{k}": v for k, v in stem[0].state_dict().items()}
    state |= {f"bn1.{k}": v for k, v in stem[1].state_dict().items()}
    for index, block in enumerate(blocks):
        group, position = divmod(index, 2)
        state |= {f"layer{group + 1}.{position}.{k}": v for k, v in block.state_dict().items()}
    state |= {f"fc.{k}": v for k, v in classifier[2].state_dict().items()}
    return {k: v.clone() for k, v in state.items()}


def test_unknown_architecture_field_is_named() -> None:
    with pytest.raises(ModelError, match=r"architecture: distilgpt2 has no field \['n_layers'\]"):
        stage_ranges(pipeline("distilgpt2", ["full"], architecture={"n_layers": 2}), DataConfig())
