"""timm models through one entry point and one feature API (``forward_intermediates``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import torch

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def resolve_workers(value, device: torch.device) -> int:
    """'auto' data-loading workers: on CUDA up to 8 (one core stays with the main process); on
    CPU only the cores the model's threads leave free, since a worker competing with the forward
    pass for a core slows it more than decoding in the main process does."""
    if value != "auto":
        return int(value)
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(0, min(8, cores - 1))
    return max(0, min(8, cores - torch.get_num_threads()))


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; a no-op on CPU (results there stay float32)."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def create(
    name: str,
    kwargs: dict[str, Any],
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | None = None,
) -> torch.nn.Module:
    import timm

    kw = {"num_classes": num_classes, **kwargs}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kw)
    except RuntimeError as e:
        raise PipelineError(f"timm model {name!r}: {e}") from None
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a bad file
        raise PipelineError(f"{path}: not a loadable checkpoint ({e})") from None
    state = obj
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PipelineError(
            f"{path}: checkpoint does not fit the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the state dict (sorted names, dtypes, shapes, bytes): independent of file format."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def depth(model: torch.nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if info:
        return len(info)
    return len(model.blocks)


def layer_names(model: torch.nn.Module, indices: list[int]) -> list[str]:
    """The module names ``forward_intermediates`` takes each index from (e.g. 'blocks.6')."""
    d = depth(model)
    info = getattr(model, "feature_info", None)
    out = []
    for i in indices:
        j = i % d
        out.append(info[j]["module"] if info else f"blocks.{j}")
    return out


def intermediates(model: torch.nn.Module, x: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, list]:
    """(logits, [NCHW features of each index]) in one forward pass; prefix tokens dropped, no norm."""
    if not indices:
        return model(x), []
    final, feats = model.forward_intermediates(x, indices=list(indices), output_fmt="NCHW")
    logits = model.forward_head(final)
    return logits, list(feats)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    k = min(max(ks), logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == y[:, None]
    return [int(hit[:, : min(kk, k)].any(1).sum()) for kk in ks]
