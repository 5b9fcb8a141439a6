"""Configuration: pydantic models, one section per concern, loaded from YAML plus command-line overrides.

Every field says its unit. Unknown fields are errors. `load_config` reports any problem as one
`ConfigError` line naming the file (or the override), the field and what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distqat.errors import ConfigError

DEFAULT_CONFIG_NAME = Path("configs") / "demo.yaml"


def default_config_path() -> Path:
    """configs/demo.yaml of the working directory, else of the source checkout DistQat runs from."""
    here = Path.cwd() / DEFAULT_CONFIG_NAME
    return here if here.is_file() else Path(__file__).resolve().parents[2] / DEFAULT_CONFIG_NAME


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset_name: str = Field(
        "fashion_mnist",
        description="what to train on: an offline source (fashion_mnist, shakespeare, spoken_digits), a local file "
        "or folder (IDX files, CIFAR python batches, image or WAV class folders, .txt files, parquet/csv/json "
        "files), or a Hugging Face hub name (uoft-cs/cifar10, wikitext; needs internet)",
    )
    dataset_config: str | None = Field(None, description="sub-config of a Hugging Face hub dataset (wikitext-2-raw-v1)")
    dataset_split: str = Field("train", description="split to train on ('train'; hub datasets: any of theirs)")
    data_dir: str | None = Field(
        None, description="folder with the dataset's files, or its cache; None: where its package puts them"
    )
    task_type: Literal["cv", "llm", "speech"] = Field(
        "cv", description="task: sets collate, batch shapes and the eval metric (cv, llm or speech)"
    )
    num_workers: int = Field(0, ge=0, description="threads that decode or synthesise a dataset on its first load")
    precision: Literal["fp32", "fp16-mixed", "bf16", "bf16-mixed"] = Field(
        "fp32", description="compute precision of the stages (mixed modes autocast on the stage's device)"
    )
    num_channels: int = Field(1, ge=1, le=4, description="image channels")
    img_size: int = Field(28, ge=8, description="image side in pixels (images are resized to this)")
    seq_len: int = Field(128, ge=1, description="tokens per sequence (llm)")
    tokenizer: str = Field(
        "gpt2", description="llm tokenizer: 'gpt2' (offline GPT-2 BPE), or a Hugging Face tokenizer name or folder"
    )
    audio_len: int = Field(16000, ge=160, description="samples per utterance at 16 kHz (speech; padded or cut)")
    max_samples: int | None = Field(None, ge=1, description="use only the first N samples (None: all)")
    eval_split: str = Field("test", description="held-out split the trainer evaluates on")
    eval_every: int = Field(0, ge=0, description="trainer steps between two held-out evaluations (0: never)")
    eval_samples: int = Field(256, ge=1, description="held-out samples (llm: sequences) per evaluation")


class OptimConfig(Section):
    type: Literal["adam", "adamw", "sgd"] = Field("adam", description="optimiser")
    adam_lr: float = Field(1e-3, gt=0, description="learning rate of adam/adamw")
    adam_weight_decay: float = Field(0.0, ge=0, description="weight decay of adam/adamw")
    adam_betas1: float = Field(0.9, ge=0, lt=1, description="adam beta1")
    adam_betas2: float = Field(0.999, ge=0, lt=1, description="adam beta2")
    sgd_lr: float = Field(0.1, gt=0, description="learning rate of sgd")
    sgd_momentum: float = Field(0.0, ge=0, lt=1, description="momentum of sgd")
    sgd_nesterov: bool = Field(False, description="Nesterov momentum (needs sgd_momentum > 0)")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.type == "sgd" and self.sgd_nesterov and self.sgd_momentum <= 0:
            raise ValueError("sgd_nesterov needs sgd_momentum > 0")
        return self


class DilocoConfig(Section):
    enable: bool = Field(True, description="average the replicas of each stage with DiLoCo (false: they train apart)")
    inner_optim: OptimConfig = Field(default_factory=OptimConfig, description="each replica's local optimiser")
    outer_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9, sgd_nesterov=True),
        description="optimiser applied to the averaged pseudo-gradient (params at round start - params now)",
    )
    inner_steps: int = Field(
        500, ge=1, description="inner steps per replica between two averaging rounds (counted in samples of the stage)"
    )
    outer_steps: int = Field(100, ge=1, description="averaging rounds of a run; after the last, replicas train apart")
    batch_size_per_step: int = Field(32, ge=1, description="samples per training step (per trainer)")
    averaging_timeout: float = Field(
        60.0, gt=0, description="seconds an averaging round may take, matchmaking included"
    )
    matchmaking_time: float = Field(
        3.0, gt=0, description="seconds a replica waits for the other replicas of its stage to join a round"
    )
    compression: Literal["none", "fp16", "int8"] = Field(
        "none", description="encoding of pseudo-gradients on the wire during averaging"
    )


class StageConfig(Section):
    model_name: str = Field(description="'<family>.<stage>', e.g. 'resnet18.head'")
    num_classes: int = Field(10, ge=1, description="output classes (classification models)")
    name: str | None = Field(None, description="stage name in uids and the DHT; default: the part after the dot")
    layers: list[int] | None = Field(
        None,
        description="[start, end): units of the family's full model this stage runs (built-in families; units are "
        "listed by `distqat dry-run`); None: cut by model_pipeline.split",
    )

    @field_validator("layers")
    @classmethod
    def _unit_range(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 2 or not 0 <= value[0] < value[1]):
            raise ValueError(f"{value} is not a unit range [start, end] with 0 <= start < end")
        return value

    @field_validator("model_name")
    @classmethod
    def _family_dot_stage(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+", value):
            raise ValueError(f"'{value}' is not of the form '<family>.<stage>'")
        return value

    @property
    def stage_name(self) -> str:
        return self.name or self.model_name.split(".", 1)[1]


class ModelPipelineConfig(Section):
    pipeline: list[StageConfig] = Field(min_length=1, description="the stages, in order")
    forward_timeout: float = Field(90.0, gt=0, description="seconds a stage's forward may take")
    backward_timeout: float = Field(180.0, gt=0, description="seconds a stage's backward may take")
    split: Literal["default", "params"] = Field(
        "default",
        description="how stages without 'layers' are cut: 'default' (the family's documented cut: ResNet between "
        "layer groups; transformers: embeddings in head, blocks spread over the stages, norm and output head in "
        "tail) or 'params' (balanced parameter counts)",
    )
    architecture: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the family's architecture config (e.g. n_layer, n_embd, n_head for distilgpt2; "
        "num_layers, hidden_size for gptneo; num_hidden_layers, hidden_size for wav2vec2; stem for resnet)",
    )
    pretrained_path: str | None = Field(
        None,
        description="local Hugging Face model folder (config.json + weights) to load the stages' weights from "
        "(ResNet: a torchvision state-dict file, .pth or .safetensors); None: random init from the seed",
    )
    model_module: str | None = Field(
        None,
        description="Python file (absolute, or relative to the working directory) imported before the stages "
        "are built, so its @register_expert_class models can be named in the pipeline",
    )

    @field_validator("pretrained_path", "model_module", mode="before")
    @classmethod
    def _none_path_spelled_out(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in {"none", "null", ""} else value

    @model_validator(mode="after")
    def _unique_stage_names(self) -> ModelPipelineConfig:
        names = [stage.stage_name for stage in self.pipeline]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique, repeated: {duplicates} (set 'name' on the stages)")
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"stage name '{name}' may only hold letters, digits, '_' and '-'")
        return self

    @property
    def stage_names(self) -> list[str]:
        return [stage.stage_name for stage in self.pipeline]


QuantLayerType = Literal["Linear", "Conv1d", "Conv2d", "Conv1D"]
BoundaryActivations = Literal["none", "fp16", "int8", "codes"]
BoundaryGradients = Literal["none", "fp16", "int8"]


class QuantScheme(Section):
    """Which layers of a stage get LSQ quantisers, and at how many bits (distqat.quant.scheme)."""

    weight_bits: int = Field(8, ge=2, le=8, description="bits of every quantised layer's weights (2..8)")
    activation_bits: int = Field(8, ge=2, le=8, description="bits of every quantised layer's input activations (2..8)")
    layer_types: list[QuantLayerType] = Field(
        default_factory=lambda: ["Conv2d", "Linear", "Conv1D"],
        min_length=1,
        description="layer types that get quantisers (Linear, Conv1d, Conv2d, and Conv1D: transformers' GPT-2 layer)",
    )
    per_channel_weights: bool = Field(True, description="one weight step per output channel (false: per tensor)")
    skip_first: bool = Field(True, description="keep the model's first quantisable layer in full precision (LSQ)")
    skip_last: bool = Field(True, description="keep the model's last quantisable layer in full precision (LSQ)")
    skip: list[str] = Field(
        default_factory=list,
        description="names of modules within the stage, as print(stage) shows them (fnmatch patterns, e.g. "
        "'3.*'), kept in full precision",
    )


class QuantStageOverride(Section):
    """Per-stage changes to the quant scheme; unset fields keep the section's value."""

    weight_bits: int | None = Field(None, ge=2, le=8)
    activation_bits: int | None = Field(None, ge=2, le=8)
    layer_types: list[QuantLayerType] | None = Field(None, min_length=1)
    per_channel_weights: bool | None = None
    skip_first: bool | None = None
    skip_last: bool | None = None
    skip: list[str] | None = None


class BoundaryConfig(Section):
    """How one stage boundary's traffic is encoded on the wire (distqat.swarm.boundary_codecs)."""

    activations: BoundaryActivations = Field(
        "none",
        description="encoding of the stage's output: none (fp32), fp16, int8 (blockwise absmax), or codes (the "
        "output is LSQ-quantised to `bits` and sent as bit-packed integer codes plus the step; needs quant.enable)",
    )
    gradients: BoundaryGradients = Field("none", description="encoding of the gradient sent back over the boundary")
    bits: int = Field(8, ge=2, le=8, description="bits of the stage's output quantiser when activations is codes")


class QuantConfig(QuantScheme):
    enable: bool = Field(
        False, description="LSQ quantization-aware training (--disable-quant turns it and 'codes' boundaries off)"
    )
    stages: dict[str, QuantStageOverride] = Field(
        default_factory=dict,
        description="per-stage overrides of the scheme, keyed by stage name, e.g. {tail: {weight_bits: 4}} (fields: "
        "weight_bits, activation_bits, layer_types, per_channel_weights, skip_first, skip_last, skip)",
    )
    boundary: BoundaryConfig = Field(
        default_factory=BoundaryConfig, description="wire encoding of every stage boundary (see boundaries)"
    )
    boundaries: dict[str, BoundaryConfig] = Field(
        default_factory=dict,
        description="per-boundary encodings, keyed by the name of the stage that sends the activations, e.g. "
        "{head: {activations: codes, bits: 4, gradients: fp16}}",
    )

    def scheme_for(self, stage_name: str) -> QuantScheme:
        """The scheme of one stage: the section's fields with the stage's overrides applied."""
        fields = {name: getattr(self, name) for name in QuantScheme.model_fields}
        override = self.stages.get(stage_name)
        if override is not None:
            fields.update(override.model_dump(exclude_none=True))
        return QuantScheme.model_validate(fields)

    def boundary_for(self, stage_name: str) -> BoundaryConfig:
        """The encoding of the boundary after `stage_name`; `codes` only while quantisation is on."""
        boundary = self.boundaries.get(stage_name, self.boundary)
        if boundary.activations == "codes" and not self.enable:
            return boundary.model_copy(update={"activations": "none"})
        return boundary


class ParamMirrorConfig(Section):
    enable: bool = Field(
        False,
        description="`distqat local` and `distqat coordinator` also run a param mirror (`distqat mirror`): a CPU copy "
        "of every stage, pulled from a live replica after each DiLoCo round, served to joiners and checkpointed "
        "(needs diloco.enable)",
    )
    refresh_every: float = Field(
        30.0,
        gt=0,
        description="seconds: the mirror also pulls a stage that trained on without a DiLoCo round after this long, "
        "and writes a stage's checkpoint at least this often while it changes",
    )
    checkpoint_dir: str | None = Field(
        None, description="folder of the stage checkpoints (servers' and the mirror's); None: <log_dir>/checkpoints"
    )


class CheckpointConfig(Section):
    enable: bool = Field(True, description="every stage server writes its replica's state to the checkpoint folder")
    every: float = Field(30.0, gt=0, description="seconds between two checkpoints of a server")
    keep: int = Field(3, ge=1, description="checkpoints kept per stage (older ones are deleted)")
    resume: bool = Field(
        True, description="a server that finds no live replica of its stage starts from the newest checkpoint"
    )
    every_rounds: int | None = Field(
        None,
        ge=1,
        description="also write a checkpoint after this many DiLoCo rounds (servers and the mirror); None: by time",
    )
    newer_than: float | None = Field(
        None,
        description="Unix time: checkpoints written before it are ignored. `distqat local`/`coordinator` set it to "
        "their start unless --resume, so a new run never picks up an earlier run's checkpoints",
    )


class DataServerConfig(Section):
    enable: bool = Field(
        True, description="the client runs one data server that hands batches to its trainers through shared memory"
    )
    pool_size: int = Field(16, ge=1, description="shared-memory batch slots (ready batches plus one per trainer)")
    num_workers: int = Field(2, ge=1, description="data server threads that prepare batches")
    shuffle_buffer: int = Field(10000, ge=1, description="samples in the shuffle buffer (bounds shuffle memory)")
    timeout: float = Field(60.0, gt=0, description="seconds a trainer waits for a batch before it gives up")
    prefetch: int = Field(4, ge=1, description="batches prepared ahead by a trainer that loads data itself")


class NetworkConfig(Section):
    host: str = Field("127.0.0.1", description="address to listen on (with public_ip set: 0.0.0.0)")
    port: int = Field(0, ge=0, le=65535, description="DHT/P2P TCP port; 0 picks a free one")
    public_ip: str | None = Field(None, description="address other machines reach this one at")
    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of peers to join")
    heartbeat_period: float = Field(1.0, gt=0, description="seconds between a server's announcements")
    heartbeat_expiry: float = Field(
        4.0, gt=0, description="seconds an announcement lives: a dead server vanishes after it"
    )
    client_poll_period: float = Field(1.0, gt=0, description="seconds between the client's looks at the DHT")
    metrics_period: float = Field(1.0, gt=0, description="seconds between a trainer's metric records")
    dht_timeout: float = Field(15.0, gt=0, description="seconds any DHT call may take")
    ban_time: float = Field(15.0, ge=0, description="seconds a replica that failed a call is avoided")
    max_pipelines: int | None = Field(
        None, ge=1, description="cap on trainers the client runs (None: one per pipeline)"
    )
    trainer_grace: float = Field(
        10.0,
        ge=0,
        description="seconds the complete pipelines must stay fewer than the trainers before the client stops "
        "one (a replica that misses a heartbeat or two does not cost a trainer restart)",
    )
    rebalance_after: float = Field(
        10.0,
        ge=0,
        description="seconds a stage must stay without replica before a spare of another stage moves to it "
        "(0: servers never move)",
    )
    # The direct tensor channel (swarm/direct.py): stage tensors over plain TCP instead of through p2pd.
    tensor_transport: Literal["auto", "p2p"] = Field(
        "auto",
        description="how stage tensors travel: 'auto' over a direct TCP connection to servers that announce one "
        "(p2p when it cannot be reached); 'p2p' always through hivemind's p2pd (encrypted; a server then "
        "opens no tensor port)",
    )
    tensor_host: str | None = Field(
        None,
        description="address a server's tensor channel listens on; None: network.host (0.0.0.0 with public_ip)",
    )
    tensor_port: int = Field(
        0, ge=0, le=65535, description="TCP port of a server's tensor channel; 0 picks a free one (firewalls: set it)"
    )
    tensor_connect_timeout: float = Field(
        2.0, gt=0, description="seconds a trainer waits to connect to a tensor channel before it uses p2p"
    )
    tensor_fallback_time: float = Field(
        60.0, ge=0, description="seconds a server whose tensor channel could not be reached is called over p2p"
    )
    tensor_max_message_mib: float = Field(
        1024.0, gt=0, description="largest message (MiB) the tensor channel accepts; larger ones are refused"
    )

    @field_validator("initial_peers", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [peer.strip() for peer in value.split(",") if peer.strip()]
        return value

    @field_validator("tensor_host")
    @classmethod
    def _ipv4_tensor_host(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise ValueError(f"'{value}' is not an IPv4 address (the tensor channel announces host:port)") from None
        return value

    @model_validator(mode="after")
    def _expiry_after_period(self) -> NetworkConfig:
        if self.heartbeat_expiry <= self.heartbeat_period:
            raise ValueError("heartbeat_expiry must be longer than heartbeat_period")
        return self


class PipeliningConfig(Section):
    """Micro-batches in flight between trainers and stage servers (distributed/schedule.py, compute_queue.py)."""

    in_flight: int = Field(
        1,
        ge=1,
        le=64,
        description="micro-batches (of diloco.batch_size_per_step samples each) a trainer keeps in flight through "
        "the stages at once; 1: one after another",
    )
    server_max_in_flight: int = Field(
        32,
        ge=1,
        description="forwards a stage server holds at once, queued or waiting for their backward, over all trainers; "
        "further forwards get a busy reply (the trainer backs off and retries) instead of growing memory",
    )
    server_max_in_flight_per_trainer: int = Field(
        8,
        ge=1,
        description="the same bound per trainer, so that a dead trainer's micro-batches cannot lock out the others",
    )
    server_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of each stage server started by `distqat local`/`distqat servers`; None: the "
        "machine's cores divided among the servers computing at once",
    )
    busy_backoff: float = Field(
        0.05, gt=0, description="seconds a trainer first waits after a busy reply (doubling, at most 1 s)"
    )


class MonitorConfig(Section):
    tensorboard: bool = Field(
        False, description="also write the monitor's metrics as TensorBoard event files in <log_dir>/tensorboard"
    )
    plots: bool = Field(True, description="draw PNG plots of the run in <log_dir>/plots when the monitor stops")
    live_view: Literal["auto", "rich", "plain"] = Field(
        "auto", description="launchers' progress display: 'rich' live tables, 'plain' lines; 'auto': rich on a terminal"
    )
    straggler_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a replica or trainer below this fraction of its peers' median samples/s is a straggler",
    )


class Config(Section):
    experiment_prefix: str = Field("distqat", description="names the run: log dir, W&B run, DHT keys")
    wandb_project: str | None = Field(None, description="W&B project; None: no W&B")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user)")
    log_dir: str | None = Field(None, description="folder of the per-role logs; None: logs/<experiment_prefix>")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N' for stage servers")
    world_size: int | None = Field(None, ge=1, description="servers `distqat local` starts; None: one per stage")
    max_expert_index: int = Field(128, ge=1, description="replica indices per stage go 0..max_expert_index-1")
    seed: int = Field(0, description="seed of model init and data order")

    data: DataConfig = Field(default_factory=DataConfig)
    diloco: DilocoConfig = Field(default_factory=DilocoConfig)
    model_pipeline: ModelPipelineConfig
    quant: QuantConfig = Field(default_factory=QuantConfig)
    param_mirror: ParamMirrorConfig = Field(default_factory=ParamMirrorConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data_server: DataServerConfig = Field(default_factory=DataServerConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    pipelining: PipeliningConfig = Field(default_factory=PipeliningConfig)

    @field_validator("experiment_prefix")
    @classmethod
    def _safe_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", value):
            raise ValueError("may only hold letters, digits, '_', '.' and '-'")
        return value

    @field_validator("wandb_project", "wandb_entity", "log_dir", mode="before")
    @classmethod
    def _none_spelled_out(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in {"none", "null", ""} else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"'{value}' is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @model_validator(mode="after")
    def _mirror_needs_diloco(self) -> Config:
        if self.param_mirror.enable and not self.diloco.enable:
            raise ValueError(
                "param_mirror.enable: the mirror downloads stage states through DiLoCo's state sharing; "
                "it needs diloco.enable true"
            )
        return self

    @model_validator(mode="after")
    def _quant_stages_exist(self) -> Config:
        names = self.model_pipeline.stage_names
        for field, keys, allowed in (
            ("quant.stages", self.quant.stages, names),
            ("quant.boundaries", self.quant.boundaries, names[:-1]),  # the last stage's output goes to the loss
        ):
            for key in keys:
                if key not in allowed:
                    raise ValueError(
                        f"{field}.{key}: not a stage boundary of model_pipeline (stages with a boundary after them: "
                        f"{', '.join(allowed) or 'none'})"
                        if field == "quant.boundaries"
                        else f"{field}.{key}: not a stage of model_pipeline (stages: {', '.join(allowed)})"
                    )
        return self

    @property
    def resolved_log_dir(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path("logs") / self.experiment_prefix

    @property
    def resolved_checkpoint_dir(self) -> Path:
        # In the log dir by default: a run's checkpoints never leak into an unrelated run's (or test's).
        directory = self.param_mirror.checkpoint_dir
        return Path(directory) if directory else self.resolved_log_dir / "checkpoints"

    @property
    def num_stages(self) -> int:
        return len(self.model_pipeline.pipeline)


# ---------------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `--section.field value` overrides, validate; raise one-line ConfigError."""
    path = Path(path) if path is not None else default_config_path()
    raw = _read_yaml(path)
    pairs = parse_override_args(overrides)
    for dotted, text in pairs:
        keys = resolve_override_key(dotted)
        _set_nested(raw, keys, _parse_value(text))
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{path}: {format_validation_error(error)}") from None


def dump_config(config: Config, path: Path) -> None:
    """Write the fully resolved config, so child processes see exactly what the parent validated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return data


def format_validation_error(error: ValidationError) -> str:
    """All of a validation error's problems on one line: `field.path: what is wrong (got value)`."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in item and not isinstance(item["input"], dict | list):
            message = f"{message} (got {item['input']!r})"
        # A whole-config check (loc empty) names its fields in its message.
        parts.append(f"{field}: {message}" if item["loc"] else message)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# command-line overrides: `--diloco.batch-size-per-step 16`, `--diloco-batch-size-per-step=16`, `--device cpu`


def parse_override_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """Pair `--key value` / `--key=value` / bare `--flag` (meaning true) tokens."""
    pairs: list[tuple[str, str]] = []
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(
                f"command line: unexpected argument '{token}' (overrides look like --section.field VALUE)"
            )
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            following = args[index + 1] if index + 1 < len(args) else None
            if following is None or following.startswith("--"):
                value = "true"
            else:
                value = following
                index += 1
        pairs.append((key, value))
        index += 1
    return pairs


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(_leaf_paths(annotation, (*prefix, name)))
        else:
            paths.append((*prefix, name))
    return paths


def _spellings(path: tuple[str, ...]) -> set[str]:
    dotted = ".".join(path)
    return {dotted, dotted.replace("_", "-"), "-".join(path).replace("_", "-"), "_".join(path)}


def resolve_override_key(key: str) -> tuple[str, ...]:
    """Map a command-line key to a config path, accepting dotted, dashed and unique-leaf spellings."""
    normalized = key.replace("_", "-")
    paths = _leaf_paths(Config)
    for path in paths:
        if key in _spellings(path) or normalized in _spellings(path):
            return path
    # The docs' short forms (`--initial-peers`, `--public-ip`) name a leaf that is unique across sections.
    leaf_matches = [path for path in paths if path[-1].replace("_", "-") == normalized]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        options = ", ".join("--" + ".".join(p).replace("_", "-") for p in leaf_matches)
        raise ConfigError(f"command line: --{key} is ambiguous, say one of {options}")
    raise ConfigError(f"command line: --{key} is not a config field (every field: configs/template_config.yaml)")


def _parse_value(text: str) -> Any:
    if text.strip().lower() in {"none", "null"}:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_nested(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


# ---------------------------------------------------------------------------------------------------------
# the documented template: configs/template_config.yaml is this function's output (a test keeps them equal)

_TEMPLATE_HEADER = """\
# Every DistQat config field, with its meaning, unit and default. Generated from distqat/config.py:
#   python -c "from distqat.config import render_template; print(render_template(), end='')" \\
#     > configs/template_config.yaml
# Any field can be overridden on the command line: --section.field VALUE (or --section-field VALUE).
"""
_TEMPLATE_PIPELINE = [
    {"model_name": "resnet18.head", "num_classes": 10},
    {"model_name": "resnet18.tail", "num_classes": 10},
]


def render_template() -> str:
    lines = [_TEMPLATE_HEADER.rstrip("\n")]
    _render_fields(Config, Config.model_validate({"model_pipeline": {"pipeline": _TEMPLATE_PIPELINE}}), 0, lines)
    return "\n".join(lines) + "\n"


def _render_fields(model: type[BaseModel], values: BaseModel, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for name, field in model.model_fields.items():
        value = getattr(values, name)
        if isinstance(value, BaseModel):
            if depth == 0:
                lines.append("")
            if field.description:
                lines.append(f"{indent}# {field.description}")
            lines.append(f"{indent}{name}:")
            _render_fields(type(value), value, depth + 1, lines)
            continue
        if field.description:
            lines.append(f"{indent}# {field.description}")
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            _render_item_fields(type(value[0]), indent, lines)
        dumped = yaml.safe_dump({name: _plain(value)}, default_flow_style=False, sort_keys=False, width=200)
        lines.extend(indent + line for line in dumped.rstrip("\n").splitlines())


def _render_item_fields(model: type[BaseModel], indent: str, lines: list[str]) -> None:
    """The fields of a list's items (the pipeline's stages), as comments: each with its default."""
    lines.append(f"{indent}# each item has:")
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"{indent}#   {name}: {field.description} ({default})")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
