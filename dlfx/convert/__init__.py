"""Name maps from other frameworks' weights to dlfx models: torchvision ResNet, Hugging Face GPT-2 and ViT.

Each converter takes a flat `name -> numpy array` state dict (and the source's config) and returns
`(model, {"params/a/b": array, "batch_stats/a/b": array, ...}, unused_source_names)`.
"""

from dlfx.convert.hf import gpt2, vit
from dlfx.convert.io import read_state_dict
from dlfx.convert.torchvision import resnet

__all__ = ["gpt2", "read_state_dict", "resnet", "vit"]
