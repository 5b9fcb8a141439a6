"""ResNet-18/50/101 from torchvision, as families `resnet18`, `resnet50`, `resnet101`.

Units: the stem (conv, norm, ReLU, max-pool), every residual block of layer1..layer4, and the classifier
(average pool, flatten, fc). Default cuts: two stages meet between layer2 and layer3, three stages at
layer2 and layer4. Small images (img_size < 64) get a 3x3 stride-1 stem without max-pool, since 28x28 or
32x32 inputs would shrink to 1x1 by layer3 with the ImageNet stem (7x7/2 conv + max-pool);
`architecture: {stem: imagenet}` forces the original. `architecture: {blocks: [1, 1, 1, 1]}` gives a
shallower variant. `pretrained_path` loads a torchvision state dict (.pth/.pt or .safetensors) into the
whole model before it is cut.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from distqat.errors import ModelError
from distqat.models.family import BuildContext, UnitFamily, seeded
from distqat.models.registry import register_family

_SPECS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


class ResNetFamily(UnitFamily):
    architecture_keys = frozenset({"stem", "blocks", "width_per_group"})

    def __init__(self, name: str):
        self.name = name
        self.block, self.blocks = _SPECS[name]

    def _blocks(self, context: BuildContext) -> list[int]:
        blocks = context.architecture.get("blocks", self.blocks)
        if not (isinstance(blocks, list) and len(blocks) == 4 and all(isinstance(b, int) and b >= 1 for b in blocks)):
            raise ModelError(f"model_pipeline.architecture.blocks: {blocks!r} is not 4 positive block counts")
        return blocks

    def _stem(self, context: BuildContext) -> str:
        stem = context.architecture.get("stem", "small" if context.data.img_size < 64 else "imagenet")
        if stem not in ("small", "imagenet"):
            raise ModelError(f"model_pipeline.architecture.stem: '{stem}' is not 'small' or 'imagenet'")
        return stem

    def unit_names(self, context: BuildContext) -> list[str]:
        blocks = self._blocks(context)
        names = [f"layer{group + 1}.{i}" for group, count in enumerate(blocks) for i in range(count)]
        return ["stem", *names, "classifier"]

    def default_cuts(self, context: BuildContext, num_stages: int) -> list[int]:
        blocks = self._blocks(context)
        group_start = [1 + sum(blocks[:group]) for group in range(4)]  # unit index of layer1..layer4's first block
        if num_stages == 2:
            return [group_start[2]]
        if num_stages == 3:
            return [group_start[1], group_start[3]]
        return super().default_cuts(context, num_stages)

    def _model(self, context: BuildContext) -> ResNet:
        model = ResNet(
            self.block,
            self._blocks(context),
            num_classes=context.num_classes,
            width_per_group=int(context.architecture.get("width_per_group", 64)),
        )
        channels = context.data.num_channels
        if self._stem(context) == "small":
            model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif channels != 3:
            model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if context.pretrained_path:
            _load_state_dict(model, context.pretrained_path)
        return model

    def build_units(self, context: BuildContext, start: int, end: int) -> list[nn.Module]:
        # torchvision builds the whole model at once; one seed for all of it keeps a unit's weights the same
        # whichever stage it lands in. ResNet-101 builds in ~0.5 s, so building it whole per stage is cheap.
        model = seeded(context.seed, self.name, 0, lambda: self._model(context))
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
        classifier = nn.Sequential(model.avgpool, nn.Flatten(), model.fc)
        return [stem, *blocks, classifier][start:end]

    def sample_input(self, batch_size: int, context: BuildContext) -> torch.Tensor:
        data = context.data
        return torch.randn(batch_size, data.num_channels, data.img_size, data.img_size)


def _load_state_dict(model: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"model_pipeline.pretrained_path: {path}: no such file (ResNet loads a state-dict file)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as error:
        # torch's message is a header line ("Error(s) in loading state_dict ...") and one line per problem
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        problem = " ".join(lines[:2])
        problem = problem if len(problem) <= 300 else problem[:300] + " ..."
        raise ModelError(f"model_pipeline.pretrained_path: {path}: cannot load: {problem}") from None


RESNET18 = register_family(ResNetFamily("resnet18"))
RESNET50 = register_family(ResNetFamily("resnet50"))
RESNET101 = register_family(ResNetFamily("resnet101"))
