"""Fingerprints: sha256 of the canonical JSON of everything that decides a stage's output."""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# Libraries whose major.minor version can change what a stage writes.
VERSIONED = ("torch", "timm", "zarr", "numpy", "webdataset", "pillow", "scikit-learn", "torchvision")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, tuples as lists, floats via repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_default)


def _default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"not JSON-serialisable in a fingerprint: {type(o).__name__}")


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """major.minor of each decisive library (patch releases do not invalidate outputs)."""
    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for name in VERSIONED:
        try:
            v = metadata.version(name)
        except metadata.PackageNotFoundError:
            v = "absent"
        out[name] = ".".join(v.split(".")[:2])
    return out


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': [1, 2]}} -> {'a.b[0]': 1, 'a.b[1]': 2}; used to name what changed."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        if not obj and prefix:
            out[prefix] = []
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def diff(old: dict, new: dict) -> list[str]:
    """Key paths whose values differ between two fingerprint input dicts."""
    a, b = flatten(old), flatten(new)
    changed = {k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")}
    # an empty container that gained items is named by the items, not twice
    return sorted(k for k in changed if not any(o != k and o.startswith((k + ".", k + "[")) for o in changed))
