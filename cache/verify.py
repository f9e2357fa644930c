"""``python -m pipeline verify``: check a stage's output against the current config, byte by byte.

Each problem is one line naming the shard, array or row at fault; an empty list means sound.

Outputs other than the cache (a student's ``final.pt``, analyze's tables) are checked against the
sha256 of each file that their record holds (``summary["sha256"]``, :func:`file_digests`): the
stage's ``problems`` check compares them (:func:`digest_problems`, so a damaged output is stale and
``status`` names it), and a reader checks the bytes it reads (:func:`recorded_bytes`,
:func:`recorded_file`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.fingerprint import file_digest

from .layout import MANIFEST
from .reader import Cache, cache_path
from .writer import completed_shards


def verify_cache(path: Path | str, fingerprint: str | None, teacher_digest: str | None = None,
                 progress: bool = True) -> list[str]:
    """Every problem of the cache at ``path``: opening (digests, metadata), identity, each shard
    file of each array (size, checksums, finite values), and the manifest against the arrays."""
    try:
        cache = Cache(path)
    except PipelineError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - a damaged group can fail in many ways
        return [f"{path}: cannot open the cache ({type(e).__name__}: {e})"]
    return (_identity_problems(cache, fingerprint, teacher_digest) + _shard_problems(cache, progress)
            + _manifest_problems(cache))


def _identity_problems(cache: Cache, fingerprint: str | None, teacher_digest: str | None) -> list[str]:
    problems = []
    attrs, path = cache.attrs, cache.path
    if fingerprint and attrs.get("fingerprint") != fingerprint:
        problems.append(f"{path}: fingerprint {str(attrs.get('fingerprint'))[:12]} != config's {fingerprint[:12]}")
    got = attrs.get("teacher", {}).get("weights_sha256")
    if teacher_digest and got != teacher_digest:
        problems.append(f"{path}: made by teacher weights {str(got)[:12]}, current teacher is {teacher_digest[:12]}")
    return problems


def _shard_problems(cache: Cache, progress: bool) -> list[str]:
    """Markers, then every shard of every array read whole (sizes and crc32c checked)."""
    spec, path = cache.spec, cache.path
    marked = completed_shards(cache.store)
    problems = [f"{path}: shard {s} is not marked complete" for s in range(spec.num_shards) if s not in marked]
    arrays = spec.arrays()
    bar = tqdm(total=spec.num_shards * len(arrays), desc="verify", unit="shard", disable=not progress or None)
    for name in arrays:
        for s in range(spec.num_shards):
            problem = _shard_problem(cache, name, s)
            if problem:
                problems.append(problem)
            bar.update(1)
    bar.close()
    return problems


def _shard_problem(cache: Cache, name: str, s: int) -> str | None:
    a, b = cache.spec.shard_rows(s)
    try:
        cache.check_shard_file(name, s)
    except PipelineError as e:
        return str(e)
    try:
        block = cache.group[name][a:b]
    except Exception as e:  # noqa: BLE001 - checksum mismatch or a damaged shard index
        why = "checksum mismatch" if "checksum" in str(e).lower() else f"{type(e).__name__}: {e}"
        return f"{cache.path}/{name}: shard {s} (rows {a}..{b - 1}) is corrupt ({why})"
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        return f"{cache.path}/{name}: shard {s} holds non-finite values"
    return None


def _manifest_problems(cache: Cache) -> list[str]:
    """The manifest against the arrays: rows, shards, labels, row blocks, views, bad rows."""
    spec, path, attrs = cache.spec, cache.path, cache.attrs
    problems: list[str] = []
    m = cache.manifest

    def column(name: str) -> np.ndarray:
        return m.column(name).to_numpy(zero_copy_only=False)

    if m.num_rows != spec.rows:
        problems.append(f"{path}/{MANIFEST}: {m.num_rows} rows, arrays have {spec.rows}")
        return problems
    row = column("row")
    if not np.array_equal(row, np.arange(spec.rows)):
        problems.append(f"{path}/{MANIFEST}: row column is not 0..{spec.rows - 1}")
    shard = column("shard")
    bad_shard = np.flatnonzero(shard != row // spec.rows_per_shard)
    if len(bad_shard):
        problems.append(f"{path}/{MANIFEST}: row {int(bad_shard[0])} has shard {int(shard[bad_shard[0]])}")
    label = column("label")
    out = np.flatnonzero((label < 0) | (label >= spec.num_classes))
    if len(out):
        problems.append(
            f"{path}/{MANIFEST}: row {int(out[0])} has label {int(label[out[0]])} outside 0..{spec.num_classes - 1}"
        )
    split, view = column("split"), column("view")
    for blk in cache.blocks:
        sl = slice(blk.start, blk.stop)
        if not (np.all(split[sl] == blk.split) and np.all(view[sl] == blk.view)):
            problems.append(
                f"{path}/{MANIFEST}: rows {blk.start}..{blk.stop - 1} are not all {blk.split} view {blk.view}"
            )
    k = attrs.get("views", 1)
    n_train = sum(1 for b in cache.blocks if b.split == "train")
    if n_train != k:
        problems.append(f"{path}: {k} views configured, {n_train} train blocks")
    try:
        valid = cache.read("valid", 0, spec.rows)
        n_bad = int((valid == 0).sum())
        recorded = len(attrs.get("bad_rows", []))
        if n_bad != recorded:
            problems.append(f"{path}/valid: {n_bad} rows marked invalid but {recorded} bad rows recorded")
    except PipelineError:
        pass  # already reported shard by shard
    return problems


def verify_stage(runner, stage: str) -> list[str]:
    """Problems of a stage's output: what makes it not up to date (the stage's own output check,
    e.g. every student's files), then, for extract, every byte of the cache."""
    if stage not in ("extract", "distill") and not stage.startswith(("distill/", "tier/")):
        raise PipelineError(f"verify: no checks for stage {stage!r} (extract | tier/<tier> | distill | "
                            f"distill/<student>)")
    if stage.startswith("distill/"):
        runner.cfg.student(stage.split("/", 1)[1])  # an unknown student is named
    if stage.startswith("tier/"):
        runner.cfg.tier(stage.split("/", 1)[1])
    rec, damage = runner.checked_record(stage)
    fp = runner.fingerprint_of(stage)[0]
    if rec is None:
        return damage or [f"{stage}: no complete output for the current config ({fp[:12]}) under "
                          f"{runner.out_dir(stage)}; run `python -m pipeline run {stage}`"]
    if stage == "extract" or stage.startswith("tier/"):  # a tier is a cache like extract's
        teacher_rec = runner.record("teacher")
        digest = teacher_rec.summary.get("weights_sha256") if teacher_rec else None
        return verify_cache(cache_path(rec), fp, digest)
    return []  # distill: the record exists, so the students' files were checked against their sha256


# ----------------------------------------------------------------------------- recorded output files

DIGESTS = "sha256"  # the summary key of a record: output file name -> sha256 of its bytes


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """File name -> sha256 of its bytes, for the files ``names`` of ``folder`` (what a record keeps)."""
    out = {}
    for n in names:
        path = Path(folder) / n
        try:
            out[n] = file_digest(path)
        except OSError as e:
            raise PipelineError(f"{path}: cannot be read to record its sha256 ({e.strerror}); "
                                f"rerun the stage with --force") from None
    return out


def digest_problems(folder: Path, summary: dict, required: Iterable[str]) -> list[str]:
    """One line per file of ``folder`` whose recorded sha256 (``summary["sha256"]``) it no longer
    has, or that is gone, and per ``required`` file the record holds no digest of (an output
    recorded by an older version)."""
    folder = Path(folder)
    recorded = summary.get(DIGESTS) or {}
    problems = [f"{folder / 'lock.json'}: records no sha256 of {n} (written by an older version); "
                f"the next run rebuilds it" for n in required if n not in recorded]
    for name, want in sorted(recorded.items()):
        path = folder / name
        try:
            got = file_digest(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        except OSError as e:
            problems.append(f"{path}: cannot be read ({e.strerror})")
            continue
        if got != want:
            problems.append(f"{path}: sha256 mismatch, not the file its stage wrote")
    return problems


def required_record(runner, node: str):
    """The complete record of ``node`` for the current config, or a PipelineError naming why there is
    none (each damaged file, as ``status`` names it)."""
    rec, damage = runner.checked_record(node)
    if rec is None:
        why = "; ".join(damage) or f"no complete output for the current config under {runner.out_dir(node)}"
        raise PipelineError(f"{node}: {why}; run `python -m pipeline run {node}`")
    return rec


def _recorded_digest(rec, name: str) -> str:
    want = (rec.summary.get(DIGESTS) or {}).get(name)
    if want is None:
        raise PipelineError(f"{Path(rec.path) / 'lock.json'}: records no sha256 of {name}; "
                            f"rerun `python -m pipeline run {rec.stage} --force`")
    return want


def _mismatch(rec, path: Path) -> PipelineError:
    return PipelineError(f"{path}: sha256 mismatch, not the file {rec.stage} recorded in its lock.json; "
                         f"rerun `python -m pipeline run {rec.stage}`")


def recorded_bytes(rec, name: str) -> bytes:
    """The bytes of output file ``name`` of record ``rec``, read once and checked against the sha256
    the record holds (a reader parses these bytes, never the file again)."""
    path = Path(rec.path) / name
    want = _recorded_digest(rec, name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PipelineError(f"{path}: cannot be read ({e.strerror}); rerun `python -m pipeline run {rec.stage}`"
                            ) from None
    if hashlib.sha256(data).hexdigest() != want:
        raise _mismatch(rec, path)
    return data


def recorded_file(rec, name: str) -> Path:
    """The path of output file ``name`` of record ``rec`` once its bytes hash to the recorded sha256
    (for a library that reads a path: torch's checkpoints)."""
    path = Path(rec.path) / name
    want = _recorded_digest(rec, name)
    try:
        got = file_digest(path)
    except OSError as e:
        raise PipelineError(f"{path}: cannot be read ({e.strerror}); rerun `python -m pipeline run {rec.stage}`"
                            ) from None
    if got != want:
        raise _mismatch(rec, path)
    return path
