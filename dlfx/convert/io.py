"""Read a weights file (`.safetensors`, or a PyTorch `.pt`/`.pth` state dict when torch is installed)."""

from __future__ import annotations

import os

import numpy as np

from dlfx.errors import TransferError, one_line


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A flat `name -> float32/int numpy array` dict from a safetensors or PyTorch file."""
    if not os.path.isfile(path):
        raise TransferError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:
            raise TransferError(f"{path} is not a readable safetensors file: {e}") from None
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            import torch
        except ImportError:
            raise TransferError(f"{path}: reading PyTorch files needs torch (pip install 'dlfx[torch]'), "
                                f"or convert it to .safetensors") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TransferError(f"{path} is not a readable PyTorch state dict: {one_line(e)}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise TransferError(f"{path} holds a {type(state).__name__}, not a state dict")
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in state.items() if hasattr(v, "detach")}
    raise TransferError(f"{path}: unknown weights file type (expected .safetensors, .pt or .pth)")
