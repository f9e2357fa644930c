"""The read path at GPU rates: target rows per second per CPU core, read and decoded from disk.

    python benchmarks/read_path.py [--proxy] [--rows 512] [--repeat 3] [--errors 0.02]
    python benchmarks/read_path.py --rows 64 --channels 96          # a quick check on small settings

Writes one cache per encoding at the paper's shape (8 layers of 384 x 14 x 14 per row, 1000 logits;
``--channels`` changes the width) with the cache's own writer, then reads it back unit by unit
(chunk-aligned rows, every layer and the logits, all integrity checks on) in one thread, and prints
for each encoding:

* bytes per row on disk;
* ``read+decode``: rows per second per core of what a CPU student's reader thread does
  (``Cache.read_layer``: shard reads, crc32c, decompression, numpy decoding to dense float16);
* ``read only``: rows per second per core of ``Cache.read_encoded_layers`` (the same reads, no
  decoding): the CPU's share when the encoded bytes are moved to the GPU and decoded there;
* MB/s of stored bytes read and of dense float16 targets handed to the student (at read+decode);
* the cores a student at 3000 images per second needs for each path;
* torch decoding (``cache.codec.decode_layers_torch``) rows per second on the CPU, and on the GPU
  when one is present (encoded bytes moved to the device, unpacked and dequantized there), each
  checked bit for bit against the numpy decoder (a line says so when they differ).

The values: with ``--proxy``, the trained proxy's spectra (``benchmarks/proxy_teacher.py``, 128
wide) tiled to the width, each copy with its own channel permutation and signs; otherwise synthetic
maps with a trained ViT's rough structure (a few dominant directions across channels, energy in
low frequencies, each layer the previous plus an update).  Sizes of the real encodings are measured
by ``benchmarks/cache_size.py``; here the bytes matter only as the read volume.  Timings move with
the machine's load: the script prints the machine and rows/s per repeat (best and median).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

STUDENT_RATE = 3000  # images per second of a DeiT-Tiny student on one GPU


def synthetic_maps(rows: int, layers: int, channels: int, hw: int, seed: int) -> list[np.ndarray]:
    """Per layer (rows, C, H, W) float32: a residual stream of low-rank, spatially smooth maps."""
    rng = np.random.default_rng(seed)
    ky, kx = np.meshgrid(np.fft.fftfreq(hw), np.fft.fftfreq(hw), indexing="ij")
    lowpass = 1.0 / (1.0 + 8 * np.hypot(ky, kx))
    mix = rng.standard_normal((channels, 24)).astype(np.float32) * np.geomspace(3, 0.1, 24).astype(np.float32)
    out, x = [], np.zeros((rows, channels, hw, hw), np.float32)
    for _ in range(layers):
        z = rng.standard_normal((rows, 24, hw, hw)).astype(np.float32)
        z = np.fft.ifft2(np.fft.fft2(z) * lowpass).real.astype(np.float32)
        x = x + np.einsum("cr,nrhw->nchw", mix, z) + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        out.append(x.copy())
    return out


def proxy_spectra(rows: int, channels: int) -> list[np.ndarray]:
    """Per layer (rows, C, H, W//2+1, 2) float32: the trained proxy's cached spectra, tiled to C."""
    from proxy_teacher import WORKDIR, proxy_overrides

    from _common import default_runner
    from cache.reader import open_cache

    _, runner = default_runner(str(WORKDIR), proxy_overrides())
    rec = runner.record("extract")
    if rec is None:
        raise SystemExit(f"no proxy cache in {WORKDIR}: run benchmarks/proxy_teacher.py first")
    cache = open_cache(rec)
    rng = np.random.default_rng(0)
    out = []
    for la in cache.spec.layers:
        s = cache.read_layer("spectra", la.index, 0, rows).astype(np.float32)
        reps = -(-channels // s.shape[1])
        tiles = [s[:, rng.permutation(s.shape[1])] * rng.choice([-1, 1], s.shape[1])[None, :, None, None, None]
                 for _ in range(reps)]
        out.append(np.concatenate(tiles, axis=1)[:, :channels])
    return out


def settings(errors: list[float], width: int) -> dict[str, dict]:
    out = {"packed float16": {}, "int8": {"quantize": "int8"}}
    for e in errors:
        out[f"step {e:g}"] = {"quantize": "step", "error": e}
        out[f"step {e:g} delta"] = {"quantize": "step", "error": e, "delta": True}
        out[f"step {e:g} delta basis"] = {"quantize": "step", "error": e, "delta": True, "basis": True}
    e = errors[0]
    out[f"pool {width} int8"] = {"pool": width, "quantize": "int8"}
    out[f"pool {width} step {e:g} delta"] = {"pool": width, "quantize": "step", "error": e, "delta": True}
    return out


def write_cache(path: Path, dense: list, logits: np.ndarray, compress: dict, rows_per_shard: int):
    """A cache of these spectra with the given encoding, through the cache's own writer."""
    import pyarrow as pa
    import torch

    from cache.codec import pack
    from cache.encoding import calibrated_spec, encoded_layers
    from cache.layout import CacheSpec, LayerSpec
    from cache.writer import CacheWriter
    from pipeline.config import resolved_compressor
    from stages.spectral import pool_channels

    rows, c, h = dense[0].shape[:3]
    pool = compress.get("pool")
    layers = [LayerSpec(i, f"blocks.{i}", c, h, h, pooled=pool) for i in range(len(dense))]
    quantize = compress.get("quantize", "none")
    spec = CacheSpec(rows=rows, rows_per_shard=rows_per_shard, num_classes=logits.shape[1], layers=layers,
                     compressor=resolved_compressor("auto", quantize), clevel=3 if quantize == "step" else 1,
                     quantize=quantize, error=compress.get("error"))

    def pooled(i, a, b):
        t = torch.from_numpy(dense[i][a:b])
        return pool_channels(t, pool) if pool else t

    if quantize == "step":
        n = min(256, rows)
        packed = {la.name: pack(pooled(i, 0, n).to(torch.float16).float(), h).numpy() for i, la in enumerate(layers)}
        spec = calibrated_spec(spec, packed, bool(compress.get("delta")), bool(compress.get("basis")))
    writer = CacheWriter(path, spec)
    attrs = {"fingerprint": "bench", "blocks": [{"split": "train", "view": 0, "start": 0, "stop": rows}],
             "layers": [], "views": 1}
    writer.create_or_resume(attrs, pa.table({"row": np.arange(rows)}))
    for s in range(spec.num_shards):
        a, b = spec.shard_rows(s)
        data = {"logits": logits[a:b], "valid": np.ones(b - a, np.uint8)}
        enc = encoded_layers(spec, {la.name: pooled(i, a, b) for i, la in enumerate(layers)})
        for i, parts in enc.items():
            for part, t in parts.items():
                data[spec.spectrum_parts(spec.layers[i])[part]] = t.numpy()
        writer.write_shard(s, data, [])
    writer.finalize({})


def timed_reads(cache, fn, repeat: int) -> list[float]:
    """Rows per second of ``fn(cache, a, b)`` over every chunk-aligned unit, ``repeat`` times."""
    unit = cache.chunk_rows()
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        for a in range(0, cache.spec.rows, unit):
            fn(cache, a, min(cache.spec.rows, a + unit))
        rates.append(cache.spec.rows / (time.perf_counter() - t))
    return rates


def read_decode(cache, a: int, b: int) -> None:
    cache.read("logits", a, b)
    for la in cache.spec.layers:
        cache.read_layer("spectra", la.index, a, b)


def read_only(cache, a: int, b: int) -> None:
    cache.read("logits", a, b)
    cache.read_encoded_layers([la.index for la in cache.spec.layers], a, b)


def torch_decode_rate(cache, device: str, repeat: int) -> float:
    """Rows per second of decode_layers_torch on ``device`` over one unit's encoded parts (moved there
    once, outside the timing)."""
    import torch

    from cache.codec import decode_layers_torch

    unit = min(cache.chunk_rows() * 4, cache.spec.rows)
    idx = [la.index for la in cache.spec.layers]
    enc = {i: {k: torch.from_numpy(v).to(device) for k, v in p.items()}
           for i, p in cache.read_encoded_layers(idx, 0, unit).items()}
    best = 0.0
    for _ in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        decode_layers_torch(cache.spec, enc, idx)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, unit / (time.perf_counter() - t))
    return best


def device_equal(cache, device: str) -> bool:
    """Whether decode_layers_torch on ``device`` gives read_layer's float16 bits for every layer."""
    import torch

    from cache.codec import decode_layers_torch

    b = min(cache.chunk_rows(), cache.spec.rows)
    idx = [la.index for la in cache.spec.layers]
    enc = {i: {k: torch.from_numpy(v).to(device) for k, v in p.items()}
           for i, p in cache.read_encoded_layers(idx, 0, b).items()}
    got = decode_layers_torch(cache.spec, enc, idx)
    return all(np.array_equal(got[i].cpu().numpy().view(np.uint16),
                              cache.read_layer("spectra", i, 0, b).view(np.uint16)) for i in idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", action="store_true", help="tile the trained proxy's spectra (else synthetic)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--errors", default="0.02")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    from cache.reader import Cache

    torch.set_num_threads(1)  # rows per second per core: the reader is one thread
    from stages.spectral import spectrum

    wd = Path(args.workdir or tempfile.mkdtemp(prefix="bench-read-path-"))
    if args.proxy:
        dense = proxy_spectra(args.rows, args.channels)
    else:
        maps = synthetic_maps(args.rows, args.layers, args.channels, args.grid, 0)
        dense = [spectrum(torch.from_numpy(m)).numpy() for m in maps]
    logits = np.random.default_rng(1).standard_normal((args.rows, 1000)).astype(np.float16)
    width = args.channels // 2
    errors = [float(e) for e in args.errors.split(",")]
    dense_bytes = sum(d[0].size for d in dense) * 2 + 2000  # float16 targets handed over per row
    gpu = torch.cuda.is_available()
    print(f"machine: {machine()}")
    print(f"{args.rows} rows of {len(dense)} layers x {dense[0].shape[1]} x {args.grid} x {args.grid} "
          f"({'proxy spectra tiled' if args.proxy else 'synthetic maps'}) + 1000 logits; one thread; units of "
          f"chunk-aligned rows; best of {args.repeat} (median in brackets); a student at {STUDENT_RATE} images/s")
    head = (f"{'encoding':<24} {'B/row':>8} {'read+decode r/s':>22} {'read only r/s':>20} {'MB/s read':>9} "
            f"{'MB/s out':>8} {'cores cpu':>9} {'cores gpu-path':>14} {'torch cpu r/s':>13}"
            + (f" {'cuda r/s':>10}" if gpu else ""))
    print(head)
    print("-" * len(head))
    for name, compress in settings(errors, width).items():
        path = wd / name.replace(" ", "-") / "cache.zarr"
        if not (path / "shards.parquet").exists():
            write_cache(path, dense, logits, compress, args.rows_per_shard)
        cache = Cache(path)  # every check a reader makes
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.parent.name != "_complete"
                     and p.suffix not in (".json", ".parquet")) / args.rows
        full = timed_reads(cache, read_decode, args.repeat)
        enc = timed_reads(cache, read_only, args.repeat)
        rf, re_ = max(full), max(enc)
        cpu_t = torch_decode_rate(cache, "cpu", args.repeat)
        line = (f"{name:<24} {stored:>8.0f} {rf:>9.0f} ({statistics.median(full):>9.0f}) {re_:>9.0f} "
                f"({statistics.median(enc):>8.0f}) {rf * stored / 1e6:>9.1f} {rf * dense_bytes / 1e6:>8.1f} "
                f"{STUDENT_RATE / rf:>9.2f} {STUDENT_RATE / re_:>14.2f} {cpu_t:>13.0f}")
        if gpu:
            line += f" {torch_decode_rate(cache, 'cuda', args.repeat):>10.0f}"
            line += "" if device_equal(cache, "cuda") else "  CUDA DECODE DIFFERS FROM NUMPY"
        elif not device_equal(cache, "cpu"):
            line += "  TORCH DECODE DIFFERS FROM NUMPY"
        print(line, flush=True)
    print("cores cpu: read+decode on the CPU; cores gpu-path: the CPU reads (crc32c, decompression) and the GPU "
          "decodes. Reads come from the page cache after the first pass (the files were just written).")


if __name__ == "__main__":
    main()
