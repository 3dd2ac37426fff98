"""torchvision ResNet-18/34/50 state dict -> dlfx ResNet (layer names already match; layouts differ)."""

from __future__ import annotations

import re

import numpy as np

from dlfx.errors import TransferError
from dlfx.models.resnet import STAGES, ResNet

_BN = {"weight": "params/{}/scale", "bias": "params/{}/bias", "running_mean": "batch_stats/{}/mean",
       "running_var": "batch_stats/{}/var"}


def _module_path(name: str) -> str:
    """`layer1.0.downsample.0` -> `layer1_0/downsample_conv`; `layer2.1.bn2` -> `layer2_1/bn2`."""
    name = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2/", name)
    return name.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")


def resnet(state: dict[str, np.ndarray]) -> tuple[ResNet, dict[str, np.ndarray], list[str]]:
    """Build the dlfx ResNet matching a torchvision state dict and map its weights (NCHW -> NHWC)."""
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise TransferError("not a torchvision ResNet state dict (no conv1.weight / fc.weight)")
    blocks = {tuple(map(int, m.groups())) for k in state if (m := re.match(r"layer(\d)\.(\d+)\.", k))}
    counts = tuple(sum(1 for s, _ in blocks if s == stage) for stage in (1, 2, 3, 4))
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depth = next((d for d, spec in STAGES.items() if spec == (counts, kind)), None)
    if depth is None:
        raise TransferError(f"torchvision ResNet with {kind} blocks {counts} is not ResNet-18/34/50")
    model = ResNet(depth=depth, num_classes=state["fc.weight"].shape[0], width=state["conv1.weight"].shape[0],
                   stem="imagenet")
    flat, unused = {}, []
    for name, value in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        if module == "fc":
            flat[f"params/head/{'kernel' if leaf == 'weight' else 'bias'}"] = value.T if leaf == "weight" else value
        elif value.ndim == 4 and leaf == "weight":  # conv (out, in, kh, kw) -> (kh, kw, in, out)
            flat[f"params/{_module_path(module)}/kernel"] = value.transpose(2, 3, 1, 0)
        elif leaf in _BN and value.ndim == 1:
            flat[_BN[leaf].format(_module_path(module))] = value
        else:
            unused.append(name)
    return model, flat, unused
