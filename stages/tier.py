"""tier: a compact cache derived from the extract's cache, without loading the teacher.

As ml-dr publishes full, Small and Mini sets of one teacher's targets, a tier (config ``tiers``,
node ``tier/<name>``) re-encodes an exact cache into a smaller one: the first K' train views
(``views``), spectra pooled to a student width (``compress.pool``) or any lossy encoding
(``compress.quantize``: int8, step; ``compress.delta``).  A student reads it with ``tier: <name>``.

1. Rows: the source's train blocks of views 0 .. K'-1, then its val block, in the source's order
   (the rows a direct extract with ``extract.views: K'`` lays out); the manifest is the source's
   rows with new row numbers, shards and urls recorded from the tier's folder.
2. Tables: with ``quantize: step`` the quantization tables are calibrated on the source's first
   ``calibrate_rows`` rows, the float16 spectra a direct extract calibrates on.
3. Write: shard by shard, each layer's dense float16 spectra read from the source (every
   integrity check of a cache read), pooled, encoded by :mod:`cache.codec` through extract's own
   :func:`stages.extract.encoded_layers`, and written by :class:`cache.writer.CacheWriter`: whole
   shards, markers, shard index and digests, so the tier has every guarantee of a cache and a rerun
   resumes at the first unfinished shard.

A tier at the source's width with ``quantize: step`` or ``none`` holds the bytes a direct extract
with the same encoding writes on the same device (the encodings start from the float16 spectrum);
pooled and int8 tiers start from the float16 spectra instead of float32 ones, so their values can
differ from a direct extract's by the float16 rounding of the input.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from cache.codec import pack
from cache.encoding import cache_sizes, calibrated_spec, encoded_layers, resumed_spec
from cache.layout import CacheSpec, LayerSpec, root_attributes
from cache.reader import CACHE_DIR, Cache, open_cache
from cache.writer import CacheWriter
from pipeline.config import PipelineConfig, TierConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import recorded_path, resolve_recorded
from pipeline.nodes import tier_name

from .spectral import pool_channels

log = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class Span:
    """Rows [start, start + n) of the tier are rows [source, source + n) of the source cache."""

    start: int
    source: int
    n: int


def tier_rows(source: Cache, views: int | None) -> tuple[list[dict], list[Span]]:
    """The tier's row blocks and where each comes from: train views 0 .. K'-1, then val."""
    k = source.view_count("train")
    views = k if views is None else views
    if views > k:
        raise PipelineError(f"tiers: views {views}, but the cache {source.path} holds {k} train views")
    picked = [source.block("train", v) for v in range(views)] + [source.block("val", 0)]
    blocks, spans, start = [], [], 0
    for b in picked:
        n = b.stop - b.start
        blocks.append({"split": b.split, "view": b.view, "start": start, "stop": start + n})
        spans.append(Span(start, b.start, n))
        start += n
    return blocks, spans


def source_rows(spans: list[Span], a: int, b: int) -> np.ndarray:
    """The source row of each tier row in [a, b)."""
    return np.concatenate([np.arange(max(a, s.start), min(b, s.start + s.n)) - s.start + s.source
                           for s in spans if s.start < b and a < s.start + s.n])


def tier_layers(source: Cache, tier: TierConfig, where: str) -> list[LayerSpec]:
    """The source's layers at the tier's widths (pooling narrows a teacher-width layer only)."""
    pool = tier.compress.pool
    widths = list(pool) if isinstance(pool, list) else [pool] * len(source.spec.layers)
    out = []
    for layer, width in zip(source.spec.layers, widths):
        if width is None or width == layer.stored_channels:
            out.append(dataclasses.replace(layer, steps=None, base=None))
            continue
        if layer.pooled is not None or width > layer.channels:
            raise PipelineError(f"{where}.compress.pool: {width} channels for layer {layer.index} ({layer.name}), "
                                f"which the cache stores at {layer.stored_channels}: a tier pools teacher-width "
                                f"layers to a narrower width only")
        out.append(dataclasses.replace(layer, pooled=width, steps=None, base=None))
    return out


def tier_spec(source: Cache, tier: TierConfig, rows: int, where: str) -> CacheSpec:
    """The tier's spec: the source's sharding and chunk target, the tier's layers and encoding."""
    if "spectra" not in source.spec.store:
        raise PipelineError(f"{where}: the cache {source.path} stores no spectra to derive a tier from")
    c = tier.compress
    return CacheSpec(rows=rows, rows_per_shard=source.spec.rows_per_shard, num_classes=source.spec.num_classes,
                     layers=tier_layers(source, tier, where), store=("logits", "spectra"),
                     chunk_bytes=source.spec.chunk_bytes, compressor=tier.resolved_compressor(), clevel=tier.clevel,
                     packed=c.packed, quantize=c.quantize, error=c.error if c.quantize == "step" else None)


def tier_manifest(source: Cache, spans: list[Span], rows: int, rows_per_shard: int, path: Path,
                  workdir: Path) -> pa.Table:
    """The source manifest's rows of the tier, renumbered, their shard urls recorded from ``path``."""
    m = source.manifest.take(pa.array(source_rows(spans, 0, rows)))
    url = m.column("url").combine_chunks()
    if not isinstance(url, pa.DictionaryArray):
        url = url.dictionary_encode()
    urls = [recorded_path(resolve_recorded(u, source.path), path, workdir) for u in url.dictionary.to_pylist()]
    cols = {"row": pa.array(np.arange(rows, dtype=np.int64)),
            "url": pa.DictionaryArray.from_arrays(url.indices, pa.array(urls, pa.string())),
            "shard": pa.array((np.arange(rows) // rows_per_shard).astype(np.int32))}
    for name, col in cols.items():
        i = m.schema.get_field_index(name)
        m = m.set_column(i, m.field(i).with_type(col.type), col)
    return m


def dense_spectra(source: Cache, spec: CacheSpec, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Layer name -> the source's dense spectra of ``rows`` (contiguous runs read at once) as float32,
    pooled to the tier's width."""
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    out = {}
    for layer in spec.layers:
        dense = np.concatenate([source.read_layer("spectra", layer.index, int(r[0]), int(r[-1]) + 1) for r in runs])
        t = torch.from_numpy(dense).float()
        out[layer.name] = pool_channels(t, layer.stored_channels) if t.shape[1] != layer.stored_channels else t
    return out


def calibrate_from(source: Cache, spec: CacheSpec, c) -> CacheSpec:
    """The tier's quantization tables, fitted on the source's first ``calibrate_rows`` rows (the
    float16 spectra a direct extract calibrates on)."""
    rows = np.arange(min(c.calibrate_rows, spec.rows))
    dense = dense_spectra(source, spec, rows)
    packed = {la.name: pack(dense[la.name].to(torch.float16).float(), la.width).numpy() for la in spec.layers}
    log.info(f"tier: calibrating quantization tables to a relative error of {spec.error:g} on {len(rows)} rows")
    return calibrated_spec(spec, packed, c.delta, c.basis)


def shard_data(source: Cache, spec: CacheSpec, spans: list[Span], s: int) -> dict[str, np.ndarray]:
    """Every array of the tier's shard ``s``: logits and valid copied, spectra encoded."""
    a, b = spec.shard_rows(s)
    rows = source_rows(spans, a, b)
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)

    def copied(name: str) -> np.ndarray:
        return np.concatenate([source.read(name, int(r[0]), int(r[-1]) + 1) for r in runs])

    out = {"logits": copied("logits"), "valid": copied("valid")}
    for i, parts in encoded_layers(spec, dense_spectra(source, spec, rows)).items():
        layer = spec.layers[i]
        for part, t in parts.items():
            out[spec.spectrum_parts(layer)[part]] = t.numpy()
    return out


def shard_bad_rows(source: Cache, spans: list[Span], spec: CacheSpec, s: int) -> list[dict]:
    """The source's bad rows that fall in the tier's shard ``s``, with their tier row numbers."""
    a, b = spec.shard_rows(s)
    tier_of = {int(src): a + i for i, src in enumerate(source_rows(spans, a, b))}
    return [{**bad, "row": tier_of[bad["row"]]} for bad in source.attrs.get("bad_rows", []) if bad["row"] in tier_of]


def run(ctx) -> dict:
    """Derive tier ``tier/<name>`` from the extract's cache: rows, tables, then every missing shard."""
    cfg: PipelineConfig = ctx.cfg
    name = tier_name(ctx.stage)
    where = f"tiers[{[t.name for t in cfg.tiers].index(name)}] ({name})"
    tier = cfg.tier(name)
    t0 = time.time()
    source = open_cache(ctx.upstream["extract"])
    blocks, spans = tier_rows(source, tier.views)
    rows = blocks[-1]["stop"]
    path = Path(ctx.out) / CACHE_DIR
    spec = tier_spec(source, tier, rows, where)
    if spec.quantize == "step":
        spec = resumed_spec(path, ctx.fingerprint, ctx.forced) or calibrate_from(source, spec, tier.compress)
    attrs = root_attributes(ctx.fingerprint, ctx.inputs, cfg.model_dump(mode="json"), source.attrs.get("teacher", {}),
                            spec, len(blocks) - 1, blocks, cfg.data, source.attrs.get("skipped_samples", []),
                            ctx.runner.versions)
    attrs["derived_from"] = {"fingerprint": source.attrs.get("fingerprint"), "stage": "extract"}
    writer = CacheWriter(path, spec)
    manifest = tier_manifest(source, spans, rows, spec.rows_per_shard, path, ctx.runner.workdir)
    if writer.create_or_resume(attrs, manifest, fresh=ctx.forced):
        log.info(f"tier {name}: resuming, {len(writer.completed())}/{spec.num_shards} shards already complete")
    todo = [s for s in range(spec.num_shards) if s not in writer.completed()]
    for s in tqdm(todo, desc=f"tier {name}", unit="shard", disable=None):
        writer.write_shard(s, shard_data(source, spec, spans, s), shard_bad_rows(source, spans, spec, s))
    fin = writer.finalize({"tier_seconds": round(time.time() - t0, 2)})
    summary = {"rows": rows, "shards": spec.num_shards, "views": len(blocks) - 1, "bad_rows": len(fin["bad_rows"]),
               "source": source.attrs.get("fingerprint"), **cache_sizes(path, spec)}
    log.info(f"tier {name}: {rows} rows in {spec.num_shards} shards, {summary['cache_bytes'] / 2**20:.1f} MiB "
             f"from {source.path}")
    return summary
