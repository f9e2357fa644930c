"""The pipeline.yaml schema, in one place.

Loading a config never does work: it parses YAML, applies ``--set`` overrides and validates the
result against the pydantic models below; a student's ``loss:`` section is the config of the
method its ``kind`` names (the loss registry, ``losses/``).  The timm models a config names are
checked before any work by :meth:`pipeline.graph.Runner.check_models`.  Every failure is a
:class:`ConfigError` whose message is one line naming the key path, the offending value and what
is allowed, e.g.::

    extract.layers[2]: 30 is out of range for cait_xxs24_224 (-8..7)
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

import losses

from .errors import ConfigError
from .nodes import DEFAULT_CONFIG
from .schema import Section, operational


def _keys(tree: Any) -> list[str]:
    """Every key of a nested dict (lists walked too)."""
    if isinstance(tree, dict):
        return [str(k) for k in tree] + [k for v in tree.values() for k in _keys(v)]
    if isinstance(tree, list):
        return [k for v in tree for k in _keys(v)]
    return []


# --------------------------------------------------------------------------- data


class AugmentConfig(Section):
    """The train-view policy, with the arguments of timm's ``create_transform(is_training=True)``:
    random-resized crop, flip, RandAugment or color jitter, random erasing.  Used by the teacher fit,
    extract's train views and fresh views; every draw is stored per view (``stages.views``)."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"
    auto_augment: str | None = None  # timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1
    color_jitter: float | tuple[float, float, float] | tuple[float, float, float, float] = 0.0
    re_prob: float = Field(0.0, ge=0.0, le=1.0)
    re_mode: Literal["const", "rand", "pixel"] = "const"
    re_count: int = Field(1, ge=1, le=16)
    # timm's Mixup/CutMix, one partner per row stored with the view (see README "Augmentation replay")
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"needs 0 < low <= high, got {list(v)}")
        return v

    @field_validator("scale")
    @classmethod
    def _scale_le_1(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] > 1.0:
            raise ValueError(f"scale is a fraction of the image area, at most 1.0, got {list(v)}")
        return v

    @field_validator("auto_augment")
    @classmethod
    def _rand_augment(cls, v: str | None) -> str | None:
        if v:
            rand_augment_options(v)
        return v or None

    @field_validator("color_jitter")
    @classmethod
    def _jitter_range(cls, v):
        values = v if isinstance(v, tuple) else (v,)
        if any(j < 0 for j in values) or (len(values) == 4 and values[3] > 0.5):
            raise ValueError(f"color jitter strengths are >= 0 (hue at most 0.5), got {v}")
        return v

    @model_validator(mode="after")
    def _jitter_or_rand_augment(self) -> "AugmentConfig":
        jitter = self.color_jitter if isinstance(self.color_jitter, tuple) else (self.color_jitter,)
        if self.auto_augment and any(jitter):
            raise ValueError(
                f"color_jitter {self.color_jitter} with auto_augment {self.auto_augment!r}: timm's train transform "
                f"leaves color jitter out when RandAugment is on (DeiT's recipe trains without it); set "
                f"color_jitter: 0"
            )
        return self


# RandAugment's magnitude scale in timm (_LEVEL_DENOM): magnitudes run 0..10 unless `mmax` says otherwise
RAND_AUGMENT_LEVELS = 10.0


def rand_augment_options(text: str) -> dict[str, Any]:
    """The options of timm's RandAugment string (``rand-m9-mstd0.5-inc1``), by timm's grammar:
    sections ``m`` (magnitude), ``n`` (layers), ``p`` (probability), ``mstd`` (magnitude sd; over 100
    means uniform in [0, m]), ``mmax`` (magnitude clip), ``inc`` (the increasing op set).  Other
    policies (AutoAugment, AugMix, TrivialAugment, weighted op sets) are refused by name.  The op
    tables are ``stages.views.RandAugment``'s."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{text!r}: only timm's RandAugment strings ('rand-m9-mstd0.5-inc1') are replayed; "
                         f"AutoAugment, AugMix and TrivialAugment policies are not")
    out: dict[str, Any] = {"magnitude": 10.0, "layers": 2, "prob": 0.5, "magnitude_std": 0.0,
                           "magnitude_max": RAND_AUGMENT_LEVELS, "increasing": False}
    for section in parts[1:]:
        key, value = re.match(r"([a-z]*)(.*)", section).groups()
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{text!r}: section {section!r} is not a RandAugment option (m, n, p, mstd, mmax, "
                             f"inc with a number; op sets 't...' are not replayed)") from None
        if key == "m":
            out["magnitude"] = number
        elif key == "n" and number == int(number) and 1 <= number <= 16:
            out["layers"] = int(number)
        elif key == "p" and 0 <= number <= 1:
            out["prob"] = number
        elif key == "mstd" and number >= 0:
            out["magnitude_std"] = math.inf if number > 100 else number
        elif key == "mmax" and number > 0:
            out["magnitude_max"] = number
        elif key == "inc":
            out["increasing"] = bool(int(number))
        else:
            raise ValueError(f"{text!r}: section {section!r} is not a valid RandAugment option "
                             f"(m, n in 1..16, p in [0, 1], mstd >= 0, mmax > 0, inc)")
    return out


class EvalConfig(Section):
    """Val views: timm's eval transform (shorter side resized to ``image_size / crop_pct``, centre
    crop), or with ``crop_pct: null`` the whole image resized to a square."""

    crop_pct: float | None = Field(None, gt=0.0, le=1.0)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"


# every seed: torch seeds generators with up to 64 bits, and the stages derive per-epoch seeds from
# a config's seed by multiplying it (by up to 100003); seeds up to 2**32 - 1 keep those in range
MAX_SEED = 2**32 - 1
# data-loading worker processes: a count, or 'auto' (see stages.models.resolve_workers)
Workers = Union[Annotated[int, Field(ge=0)], Literal["auto"]]
# an optimizer of timm's factory (names checked against timm.optim.list_optimizers() when models are planned)
OptimizerName = Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]
# a student's train views: the first K' of the cache's views, or 'fresh' ones drawn every epoch
Views = Union[Annotated[int, Field(ge=1)], Literal["fresh"]]


def check_pixel_scale(v: tuple[float, float, float]) -> tuple[float, float, float]:
    """A mean or std of pixels scaled to [0, 1] (as views are normalized: ``(x / 255 - mean) / std``)
    lies in [0, 1]; 0-255 statistics (123.675, 58.395) would leave near-constant inputs."""
    if max(v) > 1 or min(v) < 0:
        raise ValueError(f"pixels are scaled to [0, 1] before they are normalized, so each value is in [0, 1], got "
                         f"{list(v)}; divide 0-255 statistics by 255")
    return v


class DataConfig(Section):
    source: Literal["digits", "imagefolder", "shards"] = "digits"
    root: str | None = None
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    samples_per_shard: int = Field(512, ge=1)
    train_shards: str | None = None
    val_shards: str | None = None
    num_classes: int = Field(10, ge=2)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    on_bad_sample: Literal["skip", "fail"] = "skip"
    decoded_cache_mb: int = operational(256, ge=0)  # decoded images kept per process for later views and epochs
    # input shards on a store: whole objects each process keeps in memory (one GET each) up to this
    object_cache_mb: int = operational(256, ge=0)
    # fsspec options for every store URL (input shards, extract.location): endpoint_url, client_kwargs
    # (region_name), anon...; never credentials, which come from the environment (pipeline/storage.py)
    storage_options: dict[str, Any] = operational({})

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        from .storage import CREDENTIAL_KEYS

        found = sorted(k for k in _keys(v) if k.lower() in CREDENTIAL_KEYS)
        if found:
            raise ValueError(f"{found[0]}: credentials never go in the config (it is recorded in every lock.json); "
                             f"set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                             f"GOOGLE_APPLICATION_CREDENTIALS) as the store's client expects")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"the std divides the pixels, so each must be > 0, got {list(v)}")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _pixel_scale(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_pixel_scale(v)

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        if self.source == "imagefolder" and not self.root:
            raise ValueError("data.source 'imagefolder' needs data.root (a folder of class folders)")
        if self.source == "shards" and not (self.train_shards and self.val_shards):
            raise ValueError("data.source 'shards' needs data.train_shards and data.val_shards")
        return self


# --------------------------------------------------------------------------- teacher


class FitConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(2, ge=0)
    optimizer: OptimizerName = "adamw"
    warmup_lr: float | None = Field(None, ge=0)  # the lr warmup starts from; null: lr / 100
    min_lr: float = Field(0.0, ge=0)  # the cosine's floor
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    num_workers: int = operational(0, ge=0)


class TeacherConfig(Section):
    model: str = "cait_xxs24_224"

    @model_validator(mode="after")
    def _mean_with_std(self) -> "TeacherConfig":
        if (self.mean is None) != (self.std is None):
            raise ValueError("teacher.mean and teacher.std go together (set both, or neither)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"teacher.std must be > 0, got {list(self.std)}")
        return self

    @field_validator("mean", "std")
    @classmethod
    def _pixel_scale(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        return v if v is None else check_pixel_scale(v)

    kwargs: dict[str, Any] = {}
    pretrained: bool = False
    checkpoint: str | None = None
    # the teacher's normalization; null: its pretrained config's (timm.data.resolve_model_data_config)
    # with pretrained: true, else data.mean / data.std
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    fit: FitConfig | None = FitConfig()
    device: Literal["auto", "cpu", "cuda"] = operational("auto")


# --------------------------------------------------------------------------- extract


class CompressConfig(Section):
    """How the cache encodes the teacher's layer spectra (README "Compact cache"; ``cache.codec``).

    packed: only the H*W free numbers of each channel's rfft2 half-spectrum (lossless).
    pool: teacher channels average-pooled to this width at extract, one width for every cached
        layer or one per layer; the cache then serves students of exactly that width.
    quantize: 'int8' stores each (row, channel) as int8 with a float16 scale (absmax / 127);
        'step' stores integers of a quantization table per layer and frequency calibrated at
        extract to ``error`` (student-agnostic; entropy-coded by the chunk compressor).
    error: quantize 'step': each layer's relative RMS error on the calibration rows.
    delta: quantize 'step': a layer whose block follows the previous cached layer's is stored as
        its difference from that layer's decoded values.
    calibrate_rows: quantize 'step': the first rows of the cache (train view 0) the table is fitted on.
    basis: quantize 'step': turn each layer's channels by the principal components of the calibration
        rows (every component kept) before quantizing.
    """

    packed: bool = True
    pool: int | list[int] | None = None
    quantize: Literal["none", "int8", "step"] = "none"
    error: float = Field(0.01, gt=0.0, lt=1.0)
    delta: bool = False
    calibrate_rows: int = Field(256, ge=1)
    basis: bool = False

    @field_validator("pool")
    @classmethod
    def _pool(cls, v):
        widths = [v] if isinstance(v, int) else (v or [])
        if any(w < 1 for w in widths):
            raise ValueError("channel widths must be at least 1")
        return v

    @model_validator(mode="after")
    def _step_options(self) -> "CompressConfig":
        if self.quantize == "step" and not self.packed:
            raise ValueError("quantize 'step' quantizes the packed numbers; set packed: true")
        if self.basis and self.quantize != "step":
            raise ValueError(f"basis: true turns the channels before the step quantizer, which needs quantize: step "
                             f"(quantize is {self.quantize!r})")
        if self.delta and self.quantize != "step":
            raise ValueError(f"delta: true codes a layer's difference from the previous one's decoded values, "
                             f"which needs quantize: step (quantize is {self.quantize!r})")
        return self


class ExtractConfig(Section):
    layers: list[int] = [0, 1, 6, 7]
    views: int = Field(2, ge=1)
    store: list[Literal["logits", "spectra", "features"]] = ["logits", "spectra"]
    batch_size: int = Field(128, ge=1)
    rows_per_shard: int = Field(256, ge=1)
    chunk_bytes: int = Field(1 << 20, ge=1024)
    # auto: blosc-lz4 (bit-shuffled) for float16 spectra, zstd for int8 ones (BENCHMARKS.md, codecs)
    compressor: Literal["auto", "zstd", "blosc", "blosc-lz4"] = "auto"
    clevel: int = Field(1, ge=1, le=9)  # zstd 1 encodes ~7x faster than 3 on float16 spectra, ~8% larger
    num_workers: Workers = operational("auto")
    writers: int = operational(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = operational("auto")
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    compress: CompressConfig = CompressConfig()
    # where the cache is written: null, the output folder; a store URL (s3://bucket/prefix), then
    # <location>/<fingerprint[:12]>/cache.zarr (operational: the same bytes wherever they are)
    location: str | None = operational(None)

    @field_validator("location")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        if v is not None and ("://" not in v or v.startswith("file://") or not v.split("://", 1)[1].strip("/")):
            raise ValueError("a store URL with a bucket, e.g. s3://bucket/caches (null: the cache is in the workdir)")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: list[str]) -> list[str]:
        if "logits" not in v:
            raise ValueError("extract.store must include 'logits'")
        return sorted(set(v), key=["logits", "spectra", "features"].index)

    @model_validator(mode="after")
    def _pool_per_layer(self):
        pool = self.compress.pool
        if isinstance(pool, list) and len(pool) != len(self.layers):
            raise ValueError(f"compress.pool: {len(pool)} widths for {len(self.layers)} layers {self.layers}; "
                             f"give one width, or one per layer")
        return self

    def pool_widths(self) -> list[int | None]:
        """The channel width each cached layer is pooled to at extract (None: kept at teacher width)."""
        pool = self.compress.pool
        return list(pool) if isinstance(pool, list) else [pool] * len(self.layers)

    def resolved_compressor(self) -> str:
        """The compressor the cache is written with: ``auto`` is blosc-lz4 over bit-shuffled values
        for float16 spectra (2.2x less CPU than zstd 1 each way, 1-2% fewer bytes) and zstd for
        int8 ones (6% fewer bytes than blosc-lz4, which finds nothing to shuffle in int8)."""
        return resolved_compressor(self.compressor, self.compress.quantize)


def resolved_compressor(compressor: str, quantize: str) -> str:
    """:meth:`ExtractConfig.resolved_compressor` for a compressor setting and an encoding: 'step'
    integers go to blosc's zstd over bit-shuffled values (with the zigzag form, the bit planes above
    a value's magnitude are zero and compress away: the entropy coder of the integers)."""
    if compressor != "auto":
        return compressor
    return {"int8": "zstd", "step": "blosc"}.get(quantize, "blosc-lz4")


class TierConfig(Section):
    """A compact cache derived from the extract's cache without loading the teacher (``stages.tier``;
    README "Tiers"), as ml-dr publishes full, Small and Mini sets of one teacher's targets.

    name: the tier's node is ``tier/<name>``; a student reads it with ``tier: <name>``.
    views: the first K' of the cache's train views (null: all of them); val rows are kept.
    compress: how its spectra are encoded (as ``extract.compress``: pooled, int8, step, delta).
    compressor, clevel: its chunk compressor, as ``extract.compressor`` / ``extract.clevel``.
    """

    name: str
    views: int | None = Field(None, ge=1)
    compress: CompressConfig = CompressConfig()
    compressor: Literal["auto", "zstd", "blosc", "blosc-lz4"] = "auto"
    clevel: int = Field(1, ge=1, le=9)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.=\-]+", v) or v.startswith("."):
            raise ValueError(f"tier names use letters, digits, '_', '-', '.', '=' and name folders (no leading "
                             f"'.'), got {v!r}")
        return v

    def resolved_compressor(self) -> str:
        return resolved_compressor(self.compressor, self.compress.quantize)


# --------------------------------------------------------------------------- distill


# experiment trackers a student can log to (stages.tracking); operational: they enter no fingerprint
TRACKERS = ("tensorboard", "mlflow", "wandb")
Tracker = Literal["tensorboard", "mlflow", "wandb"]


class TrainDefaults(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1, ge=0)
    optimizer: OptimizerName = "adamw"  # any of timm.optim.list_optimizers()
    warmup_lr: float | None = Field(None, ge=0)  # the lr warmup starts from; null: lr / 100
    min_lr: float = Field(0.0, ge=0)  # the cosine's floor
    mode: Literal["cached", "online"] = "cached"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    num_workers: Workers = operational("auto")
    keep_targets_mb: int = operational(2048, ge=0)  # hold decoded targets in memory when they fit
    device: Literal["auto", "cpu", "cuda"] = operational("auto")
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    # every N epochs (and the last), record the val-split layer statistics for analyze's dynamics; 0: off
    snapshot_every: int = Field(0, ge=0)
    # train views: null = all the cache's K views (epoch e: view e mod K); K' = the first K' of them;
    # 'fresh' = new view parameters every epoch (online or no-KD students: the cache has no targets for them)
    views: Views | None = None
    # train on this many images per class (a seeded subset, the same for every student); null: all
    train_per_class: int | None = Field(None, ge=1)
    # evaluate on val, log and checkpoint every N epochs and at the last (other epochs' metrics rows
    # carry their losses, and nan for the val numbers)
    eval_every: int = Field(1, ge=1)
    # DeiT's repeated augmentation: r stored views of each image in one batch (stages.repeated)
    repeated_aug: int = Field(1, ge=1)
    # experiment trackers for every student's epochs (and steps, with track_steps); README "Tracking"
    track: list[Tracker] = operational([])
    track_steps: bool = operational(False)

    @field_validator("track")
    @classmethod
    def _track_once(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


# what analyze calls the teacher in its features, tables and plots: no student may take the name
TEACHER_NAME = "teacher"
# names no student may take (compared ignoring case), with why: each would make two of analyze's
# outputs one file
RESERVED_NAMES = {
    TEACHER_NAME: "analyze's features, tables and plots call the teacher so",
    "distance": "analyze writes the students' distance curves to dynamics_distance.png, where a student so "
                "named would have its own dynamics plot",
}


class StudentConfig(Section):
    name: str
    model: str
    kwargs: dict[str, Any] = {}
    pairs: list[tuple[int, int]] = []  # [student layer, teacher layer] for the losses that compare layers
    loss: losses.LossConfig = losses.DEFAULT
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_epochs: float | None = Field(None, ge=0)
    optimizer: OptimizerName | None = None
    warmup_lr: float | None = Field(None, ge=0)
    min_lr: float | None = Field(None, ge=0)
    mode: Literal["cached", "online"] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    snapshot_every: int | None = Field(None, ge=0)
    views: Views | None = None
    train_per_class: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    repeated_aug: int | None = Field(None, ge=1)
    tier: str | None = None  # the derived cache (a name in tiers) the student reads; null: the extract's

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.=\-]+", v):
            raise ValueError(f"student names use letters, digits, '_', '-', '.', '=', got {v!r}")
        if v.startswith("."):
            raise ValueError(f"a student name names folders and files, so it cannot start with '.', got {v!r}")
        reserved = next((n for n in RESERVED_NAMES if n == v.casefold()), None)
        if reserved is not None:
            raise ValueError(f"{v!r} is reserved: {RESERVED_NAMES[reserved]}; name the student otherwise")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> "StudentConfig":
        why = losses.check(self.loss, self.pairs)
        if why:
            raise ValueError(why)
        return self


class SweepConfig(Section):
    """A grid of students made from one base student (README "Many students").

    base: a student entry; every run of the grid starts from it.
    grid: student field by dotted path -> values, e.g. ``{loss.w_fft: [0.1, 0.2], seed: [0, 1, 2]}``.
        Each combination is a student named ``<base>-<field>=<value>-...`` (the last part of each path).
    reference: the grid values of the group the others are compared with, paired by seed.
    """

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    reference: dict[str, Any] | None = None

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("a sweep needs at least one field to vary")
        for path, values in v.items():
            top = path.split(".")[0]
            if top == "name" or top not in StudentConfig.model_fields:
                fields = ", ".join(f for f in StudentConfig.model_fields if f != "name")
                raise ValueError(f"{path!r} is not a student field ({fields})")
            if not values:
                raise ValueError(f"{path}: no values")
        return v

    @model_validator(mode="after")
    def _reference(self):
        for path, value in (self.reference or {}).items():
            if path not in self.grid or value not in self.grid[path]:
                raise ValueError(f"reference: {path}={value!r} is not a value of the grid")
        return self

    def runs(self) -> list[tuple[str, dict[str, Any], dict]]:
        """(name, grid values, student entry) of every combination, in grid order."""
        import itertools

        paths = list(self.grid)
        out = []
        for combo in itertools.product(*(self.grid[p] for p in paths)):
            values = dict(zip(paths, combo))
            entry = copy.deepcopy(self.base)
            for path, value in values.items():
                _set_path(entry, path, copy.deepcopy(value))
            name = "-".join([str(self.base.get("name", "sweep"))]
                            + [f"{p.split('.')[-1]}={_name_part(v)}" for p, v in values.items()])
            entry["name"] = name
            out.append((name, values, entry))
        return out


def _name_part(value: Any) -> str:
    """A grid value as it appears in a student's name (letters, digits, '_', '-', '.', '=')."""
    text = "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text.replace(" ", ""))


def _entry_name(entry: Any) -> Any:
    return entry.get("name") if isinstance(entry, dict) else getattr(entry, "name", None)


def _as_student(entry: Any) -> dict:
    """A student entry (raw or validated) as its validated dump, to tell equal runs from clashes."""
    return (entry if isinstance(entry, StudentConfig) else StudentConfig.model_validate(entry)).model_dump()


class DistillConfig(Section):
    defaults: TrainDefaults = TrainDefaults()
    students: list[StudentConfig] = []
    sweep: list[SweepConfig] = []
    # train students as tasks of an existing Dask distributed scheduler (tcp://host:8786)
    scheduler: str | None = operational(None)
    # false: the processes --jobs and the scheduler start share no folder with this one, only the
    # store (extract.location): each trains in a scratch workdir and its output comes back here
    shared_workdir: bool = operational(True)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        return check_scheduler_address(v)

    @model_validator(mode="before")
    @classmethod
    def _expand_sweeps(cls, data: Any) -> Any:
        """Every sweep's runs become students (a student of that name already there, as in a
        dumped config, is the same run and is kept)."""
        if not isinstance(data, dict) or not data.get("sweep"):
            return data
        data = dict(data)
        students = list(data.get("students") or [])
        have = {_entry_name(s): s for s in students}
        for i, sw in enumerate(data["sweep"]):
            sweep = sw if isinstance(sw, SweepConfig) else SweepConfig.model_validate(sw)
            if not isinstance(sweep.base.get("name"), str):
                raise ValueError(f"sweep[{i}].base needs a name (it prefixes the names of its students)")
            for name, _, entry in sweep.runs():
                if name not in have:
                    students.append(entry)
                    have[name] = entry
                elif _as_student(have[name]) != _as_student(entry):
                    raise ValueError(f"sweep[{i}] makes a student named {name!r}, but another student has that "
                                     f"name; give the sweep's base another name")
        data["students"] = students
        return data

    def sweep_runs(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """Student name -> (index of its sweep, its grid values), for every sweep student."""
        return {name: (i, values) for i, sw in enumerate(self.sweep) for name, values, _ in sw.runs()}

    @field_validator("students")
    @classmethod
    def _unique(cls, v: list[StudentConfig]) -> list[StudentConfig]:
        seen: dict[str, str] = {}
        for s in v:
            other = seen.get(s.name.casefold())
            if other == s.name:
                raise ValueError(f"student name {s.name!r} appears twice")
            if other is not None:
                raise ValueError(f"student names {other!r} and {s.name!r} differ only in case: on a case-insensitive "
                                 f"filesystem (macOS, Windows) their files would be one; rename one")
            seen[s.name.casefold()] = s.name
        return v


# --------------------------------------------------------------------------- analyze


class AnalyzeConfig(Section):
    workers: int = operational(2, ge=1)
    threads_per_worker: int = operational(1, ge=1)
    scheduler: str | None = operational(None)
    memory_limit: str = operational("4GiB")  # per Dask worker: bytes ('4GiB', '2 GB'), 'auto' or a fraction
    batch_size: int = Field(256, ge=1)
    radial_bands: int = Field(4, ge=1)
    teacher_all_layers: bool = True
    max_rows: int | None = Field(None, ge=1)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        return check_scheduler_address(v)

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _memory_limit(cls, v: Any) -> Any:
        """What a Dask LocalCluster takes as ``memory_limit``: 'auto', a fraction of the machine's
        memory (0 < x <= 1), or bytes with a unit ('4GiB', '2 GB', '500MB')."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            return v
        if v == "auto":
            return v
        try:
            if 0 < float(v) <= 1:
                return v
        except ValueError:
            pass
        from dask.utils import parse_bytes

        try:
            if parse_bytes(v) > 0:
                return v
        except ValueError:
            pass
        raise ValueError("a memory limit is 'auto', a fraction of the machine's memory (0 < x <= 1) or bytes "
                         "with a unit, e.g. '4GiB'")


# a Dask scheduler's address: protocol://host:port (tcp, tls, ucx, inproc, ws, wss) or host:port
_SCHEDULER = re.compile(r"((tcp|tls|ucx|inproc|ws|wss)://)?[A-Za-z0-9_.\-\[\]:%/]+:\d+|inproc://[^\s]+")


def check_scheduler_address(v: str | None) -> str | None:
    if v is not None and not _SCHEDULER.fullmatch(v):
        raise ValueError("a Dask scheduler address is protocol://host:port, e.g. tcp://10.0.0.5:8786")
    return v


class PipelineConfig(Section):
    workdir: str = operational("work")  # where outputs live: the same outputs wherever they are
    # other workdirs (read only) whose up-to-date outputs this one uses, e.g. a lab's shared cache
    upstream_workdirs: list[str] = operational([])
    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    extract: ExtractConfig = ExtractConfig()
    distill: DistillConfig = DistillConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()
    # compact caches derived from the extract's (stages.tier), each a node tier/<name>
    tiers: list[TierConfig] = []

    @field_validator("tiers")
    @classmethod
    def _unique_tiers(cls, v: list[TierConfig]) -> list[TierConfig]:
        names = [t.name for t in v]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"tier name {n!r} appears twice")
        return v

    @model_validator(mode="after")
    def _tier_views(self) -> "PipelineConfig":
        for i, t in enumerate(self.tiers):
            if t.views is not None and t.views > self.extract.views:
                raise ValueError(f"tiers[{i}] ({t.name}): views {t.views} is more than the cache's extract.views "
                                 f"{self.extract.views}")
            pool = t.compress.pool
            if isinstance(pool, list) and len(pool) != len(self.extract.layers):
                raise ValueError(f"tiers[{i}] ({t.name}): compress.pool has {len(pool)} widths for "
                                 f"{len(self.extract.layers)} layers {self.extract.layers}; give one, or one per layer")
        return self

    @model_validator(mode="after")
    def _student_tiers(self) -> "PipelineConfig":
        names = [t.name for t in self.tiers]
        for i, s in enumerate(self.distill.students):
            if s.tier is None:
                continue
            if s.tier not in names:
                raise ValueError(f"distill.students[{i}] ({s.name}): tier {s.tier!r} is not in tiers "
                                 f"({', '.join(names) or 'none configured'})")
            views = self.tier(s.tier).views
            st = resolve_student(s, self.distill.defaults)
            if views is not None and isinstance(st.views, int) and st.views > views:
                raise ValueError(f"distill.students[{i}] ({s.name}): views {st.views} is more than tier "
                                 f"{s.tier!r} holds ({views})")
        return self

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        names = ", ".join(t.name for t in self.tiers) or "none configured"
        raise ConfigError(f"tier {name!r} is not in tiers ({names})")

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an empty workdir puts every output in the current directory; name a folder")
        return v

    @field_validator("upstream_workdirs")
    @classmethod
    def _upstream_workdirs(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise ValueError("an empty upstream workdir names the current directory; name a folder")
        return v

    @model_validator(mode="after")
    def _students_need_cache(self) -> "PipelineConfig":
        for i, s in enumerate(self.distill.students):
            st = resolve_student(s, self.distill.defaults)
            where = f"distill.students[{i}] ({s.name})"
            needs = losses.needs(st.loss, st.pairs)
            if st.mode == "cached" and needs.reads_layers and not {"spectra", "features"} & set(self.extract.store):
                raise ValueError(f"{where} reads teacher layers ({st.loss.kind}) but extract.store holds neither "
                                 f"'spectra' nor 'features'")
            if st.views == "fresh" and st.mode == "cached" and needs.reads_teacher:
                raise ValueError(f"{where}: views 'fresh' needs mode: online (the cache holds teacher targets "
                                 f"for its {self.extract.views} stored views only)")
            if isinstance(st.views, int) and st.views > self.extract.views:
                raise ValueError(f"{where}: views {st.views} is more than the cache's extract.views "
                                 f"{self.extract.views}")
            if st.repeated_aug > 1:
                views = self.extract.views if st.views is None else st.views
                if st.views == "fresh" or st.repeated_aug > views:
                    raise ValueError(f"{where}: repeated_aug {st.repeated_aug} takes that many stored views of each "
                                     f"image per epoch; the student reads {views} (views, extract.views)")
                if st.batch_size % st.repeated_aug:
                    raise ValueError(f"{where}: batch_size {st.batch_size} is not a multiple of repeated_aug "
                                     f"{st.repeated_aug} (an image's views share a batch)")
        return self

    def student(self, name: str) -> "ResolvedStudent":
        for s in self.distill.students:
            if s.name == name:
                return resolve_student(s, self.distill.defaults)
        names = ", ".join(s.name for s in self.distill.students) or "none configured"
        raise ConfigError(f"--student: {name!r} is not a student in distill.students ({names})")


class ResolvedStudent(Section):
    """A student with the shared defaults filled in: what decides its training."""

    name: str
    model: str
    kwargs: dict[str, Any]
    pairs: list[tuple[int, int]]
    loss: losses.LossConfig
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    optimizer: str
    warmup_lr: float | None
    min_lr: float
    mode: Literal["cached", "online"]
    seed: int
    num_workers: Workers = operational(...)
    keep_targets_mb: int = operational(...)
    device: str = operational(...)
    amp: str
    snapshot_every: int
    views: Views | None
    train_per_class: int | None
    eval_every: int
    repeated_aug: int
    track: list[str] = operational(...)
    track_steps: bool = operational(...)
    tier: str | None = None


def resolve_student(s: StudentConfig, d: TrainDefaults) -> ResolvedStudent:
    vals = d.model_dump()
    vals.update({k: v for k, v in s.model_dump().items() if v is not None})
    return ResolvedStudent(**vals)


# --------------------------------------------------------------------------- loading


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    """``a.b[0].c``; a key that is not a plain name (spaces, newlines, dots) as ``['...']``, so the
    path stays on one line and says which key it is."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_\-]+", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def _walk_loc(model: type[BaseModel], loc: tuple[Any, ...], keep_last: bool) -> tuple[tuple[Any, ...], Any]:
    """(the config key path of an error, the section model holding its last key).  The path keeps
    field names and list indices, without pydantic's union and validator branch tags
    ('constrained-int', "literal['auto']", 'function-after[...]'); a tag that names a member of a
    tagged union (a loss's kind) selects that member's fields for what follows."""
    out: list[Any] = []
    cur: Any = model
    ann: Any = None
    holder: Any = model
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
        elif isinstance(cur, type) and issubclass(cur, BaseModel) and part in cur.model_fields:
            out.append(part)
            holder = cur
            ann = cur.model_fields[part].annotation
            cur = _unwrap(ann)
        elif (member := _tagged(ann, part)) is not None:
            cur = member
        elif keep_last and i == len(loc) - 1:
            out.append(part)
            holder = cur
    return tuple(out), holder


def _tagged(ann: Any, tag: Any) -> Any:
    """The member of a tagged union (``Annotated[X, Tag(tag)]`` inside ``ann``) that ``tag`` names."""
    from pydantic import Tag

    for a in getattr(ann, "__args__", None) or ():
        if any(isinstance(m, Tag) and m.tag == tag for m in getattr(a, "__metadata__", ())):
            return _unwrap(a)
        found = _tagged(a, tag)
        if found is not None:
            return found
    return None


def _unwrap(ann: Any) -> Any:
    args = getattr(ann, "__args__", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in args or ():
        u = _unwrap(a)
        if isinstance(u, type) and issubclass(u, BaseModel):
            return u
    return ann


def format_validation_error(err: ValidationError, model: type[BaseModel] = PipelineConfig) -> str:
    errors = err.errors(include_url=False)
    e = errors[0]
    loc, holder = _walk_loc(model, tuple(e["loc"]), keep_last=e["type"] == "extra_forbidden")
    path = _fmt_loc(loc) or "<root>"
    value = e.get("input")
    if e["type"] == "extra_forbidden":
        allowed = list(holder.model_fields) if isinstance(holder, type) and issubclass(holder, BaseModel) else None
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{path}: unknown key{hint}"
    if e["type"] == "missing":
        return f"{path}: required key is missing"
    # a union (e.g. a count or 'auto') fails once per branch: name every allowed form
    msgs = []
    for x in errors:
        if _walk_loc(model, tuple(x["loc"]), False)[0] == loc:
            m = x["msg"].removeprefix("Value error, ")
            if m not in msgs:
                msgs.append(m)
    msg = "; or ".join(msgs)
    if (isinstance(value, (dict, list)) and len(repr(value)) > 80) or "storage_options" in map(str, loc):
        return f"{path}: {msg}"  # store options may hold a secret: never echoed
    return f"{path}: {value!r} is not allowed: {msg}"


def _set_path(tree: dict, path: str, value: Any) -> None:
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    if not parts:
        raise ConfigError(f"--set {path!r}: empty key path")
    cur: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if part.isdigit() else part
        if isinstance(cur, list):
            if not isinstance(key, int) or not (-len(cur) <= key < len(cur)):
                raise ConfigError(f"--set {path}: index {part} is out of range (list of {len(cur)})")
        elif isinstance(cur, dict):
            if isinstance(key, int):
                key = part
        else:
            raise ConfigError(f"--set {path}: {'.'.join(parts[:i])} is not a mapping or list")
        if last:
            cur[key] = value
        else:
            if isinstance(cur, dict) and (key not in cur or cur[key] is None):
                cur[key] = {}
            cur = cur[key]


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    workdir: str | None = None,
    upstream_workdirs: list[str] | None = None,
) -> PipelineConfig:
    """Read, override and validate a pipeline file (``workdir`` and ``upstream_workdirs``, given,
    replace the file's).  Raises ConfigError with one line."""
    path = Path(path or DEFAULT_CONFIG)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file "
                          f"as UTF-8") from None
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(tree, overrides, workdir, source=str(path), upstream_workdirs=upstream_workdirs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last value
    silently: a second ``extract:`` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key: the base loader names it
                continue
            if first is not None:
                lines = f"lines {first} and {line}" if first != line else f"line {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice ({lines}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """A YAML document as plain Python, a key repeated within one mapping refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def unshared(obj: Any) -> Any:
    """A copy of a YAML tree in which no two places share one dict or list.

    YAML anchors (``&student`` ... ``*student``) load as one shared object, and ``copy.deepcopy``
    keeps that sharing: an override of one student's kwargs would change every student's.
    """
    if isinstance(obj, dict):
        return {k: unshared(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unshared(v) for v in obj]
    return copy.deepcopy(obj)


def config_from_dict(
    tree: dict,
    overrides: list[str] | None = None,
    workdir: str | None = None,
    source: str = "<dict>",
    upstream_workdirs: list[str] | None = None,
) -> PipelineConfig:
    tree = unshared(tree)
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    if workdir is not None:
        tree["workdir"] = workdir
    if upstream_workdirs:
        tree["upstream_workdirs"] = list(upstream_workdirs)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
