"""timm models through one entry point and one feature API (``forward_intermediates``).

This is the only module that calls timm.  :func:`plan_models` resolves a config's models once
(depths, layer indices normalized to 0..depth-1 and checked, layer pairs) into a :class:`ModelPlan`
that the stages share.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

import losses
from pipeline.config import ConfigError, PipelineConfig
from pipeline.dist import CPUS_ENV
from pipeline.errors import PipelineError

from .tracking import check_installed

log = logging.getLogger("pipeline")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by ``PIPELINE_CPUS`` when set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    budget = os.environ.get(CPUS_ENV, "")
    return max(1, min(cores, int(budget))) if budget.isdigit() and int(budget) > 0 else cores


def resolve_workers(value, device: torch.device) -> int:
    """'auto' data-loading workers: on CUDA up to 8 (one core stays with the main process); on
    CPU only the cores the model's threads leave free, since a worker competing with the forward
    pass for a core slows it more than decoding in the main process does."""
    if value != "auto":
        return int(value)
    cores = usable_cores()
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


def load_teacher(record, cfg: PipelineConfig) -> torch.nn.Module:
    """The teacher a completed teacher record holds (``model.pt``, its digest checked), in eval mode."""
    from pathlib import Path

    t = cfg.teacher
    m = create(t.model, t.kwargs, cfg.data.num_classes, pretrained=False)
    load_checkpoint(m, str(Path(record.path) / "model.pt"))
    got = weights_digest(m)
    want = record.summary.get("weights_sha256")
    if want and got != want:
        raise PipelineError(f"{record.path}/model.pt: weights digest {got[:12]} != recorded {want[:12]}")
    return m.eval()


def load_student(runner, cfg: PipelineConfig, name: str) -> torch.nn.Module:
    """Student ``name``'s final weights, in eval mode: ``final.pt`` of its complete record, its bytes
    checked against the sha256 the record holds (a damaged or swapped file is named)."""
    from cache.verify import recorded_file, required_record
    from pipeline.nodes import student_node

    st = cfg.student(name)
    path = recorded_file(required_record(runner, student_node(name)), "final.pt")
    m = create(st.model, st.kwargs, cfg.data.num_classes)
    load_checkpoint(m, str(path))
    return m.eval()


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
    """The module names ``forward_intermediates`` takes each (normalized) index from (e.g. 'blocks.6')."""
    info = getattr(model, "feature_info", None)
    return [info[i]["module"] if info else f"blocks.{i}" for i in indices]


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


# ----------------------------------------------------------------------------- the models of a config


@dataclass(frozen=True)
class ModelPlan:
    """A config's models resolved once: depths, and every layer index normalized to 0..depth-1."""

    teacher_depth: int
    teacher_layers: tuple[int, ...]  # extract.layers
    student_depths: dict[str, int]
    pairs: dict[str, tuple[tuple[int, int], ...]]  # student -> ((student layer, teacher layer), ...)


@dataclass(frozen=True)
class Normalization:
    """What a model's input is normalized with, and where that came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "teacher.mean/std", "pretrained_cfg of <model>", "data.mean/std"


def teacher_normalization(cfg: PipelineConfig) -> Normalization:
    """The teacher's normalization: ``teacher.mean/std`` when set, else its pretrained config's
    (timm.data.resolve_model_data_config) for hub weights, else ``data.mean/std`` (a teacher fitted
    here or from a local checkpoint trained as the data says)."""
    t = cfg.teacher
    if t.mean is not None:
        return Normalization(tuple(t.mean), tuple(t.std), "teacher.mean/std")
    if t.pretrained:
        import timm
        from timm.data import resolve_model_data_config

        with torch.device("meta"):
            m = timm.create_model(t.model, pretrained=False, num_classes=cfg.data.num_classes, **t.kwargs)
        c = resolve_model_data_config(m)
        return Normalization(tuple(map(float, c["mean"])), tuple(map(float, c["std"])), f"pretrained_cfg of {t.model}")
    return Normalization(tuple(cfg.data.mean), tuple(cfg.data.std), "data.mean/std")


def meta_depth(name: str, kwargs: dict[str, Any], num_classes: int, where: str, image_size: int | None = None) -> int:
    """The number of intermediates of timm model ``name`` (:func:`meta_model`)."""
    return depth(meta_model(name, kwargs, num_classes, where, image_size))


def meta_model(name: str, kwargs: dict[str, Any], num_classes: int, where: str,
               image_size: int | None = None) -> torch.nn.Module:
    """timm model ``name`` built on the meta device (no weights), with forward_intermediates; with
    ``image_size``, the model must take inputs of that size (:func:`check_input_size`)."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"{where}.model: {name!r} is not a timm model{hint}")
    kw = {"num_classes": num_classes, **kwargs}
    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, **kw)
    except TypeError as e:
        raise ConfigError(f"{where}.kwargs: {kwargs!r} rejected by timm {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - timm raises many kinds on bad kwargs
        raise ConfigError(f"{where}.kwargs: timm {name} cannot be built with {kwargs!r}: {e}") from None
    if not hasattr(m, "forward_intermediates"):
        raise ConfigError(f"{where}.model: {name!r} has no forward_intermediates in this timm version")
    if image_size is not None:
        check_input_size(m, name, image_size, where)
    return m


def check_input_size(model: torch.nn.Module, name: str, image_size: int, where: str) -> None:
    """A model with a fixed input size (a timm patch embedding with ``strict_img_size``) must take
    ``data.image_size`` inputs: every model sees the views the data section builds."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or not getattr(pe, "strict_img_size", False):
        return
    if tuple(size) != (image_size, image_size):
        raise ConfigError(f"data.image_size: {image_size}, but {where} ({name}) takes {size[0]}x{size[1]} inputs; "
                          f"set {where}.kwargs.img_size to {image_size}, or data.image_size to {size[0]}")


def layer_index(idx: int, depth: int, name: str, where: str) -> int:
    """``idx`` (negative counts from the end) as 0..depth-1, or a ConfigError naming ``where``."""
    if not (-depth <= idx < depth):
        raise ConfigError(f"{where}: {idx} is out of range for {name} ({-depth}..{depth - 1})")
    return idx % depth


def check_optimizer(name: str, where: str) -> None:
    """``name`` must be one of timm's optimizers."""
    from timm.optim import list_optimizers

    known = list(list_optimizers())
    if name not in known:
        close = [k for k in known if k.startswith(name[:3])][:8]
        raise ConfigError(f"{where}: {name!r} is not one of timm's optimizers"
                          + (f" (close: {', '.join(close)})" if close else "")
                          + "; timm.optim.list_optimizers() lists them")


def plan_models(cfg: PipelineConfig) -> ModelPlan:
    """Check model names, kwargs and layer indices against timm, and resolve them (before any work).
    A cached spectral student's teacher layers must be among the cached ones; a student's model must
    suit its loss (:func:`losses.check_model`, e.g. a distillation token's second head)."""
    t = cfg.teacher
    if t.fit is not None:
        check_optimizer(t.fit.optimizer, "teacher.fit.optimizer")
    check_optimizer(cfg.distill.defaults.optimizer, "distill.defaults.optimizer")
    check_installed(cfg.distill.defaults.track, "distill.defaults.track")
    tdepth = meta_depth(t.model, t.kwargs, cfg.data.num_classes, "teacher", cfg.data.image_size)
    cached: list[int] = []
    for i, layer in enumerate(cfg.extract.layers):
        norm = layer_index(layer, tdepth, t.model, f"extract.layers[{i}]")
        if norm in cached:
            raise ConfigError(f"extract.layers[{i}]: {layer} names layer {norm} twice")
        cached.append(norm)
    depths, pairs = {}, {}
    for i, s in enumerate(cfg.distill.students):
        where = f"distill.students[{i}]"
        if s.optimizer:
            check_optimizer(s.optimizer, f"{where}.optimizer")
        model = meta_model(s.model, s.kwargs, cfg.data.num_classes, where, cfg.data.image_size)
        depths[s.name] = depth(model)
        if why := losses.check_model(s.loss, model):
            raise ConfigError(f"{where}.model: {why}")
        resolved = []
        for j, (sl, tl) in enumerate(s.pairs):
            sn = layer_index(sl, depths[s.name], s.model, f"{where}.pairs[{j}][0]")
            tn = layer_index(tl, tdepth, t.model, f"{where}.pairs[{j}][1]")
            mode = s.mode or cfg.distill.defaults.mode
            if losses.needs(s.loss, s.pairs).reads_layers and mode == "cached" and tn not in cached:
                raise ConfigError(f"{where}.pairs[{j}][1]: teacher layer {tl} is not in the cache "
                                  f"(extract.layers = {cfg.extract.layers})")
            resolved.append((sn, tn))
        pairs[s.name] = tuple(resolved)
    return ModelPlan(tdepth, tuple(cached), depths, pairs)
