"""Shard files written in one pass (cache.shardfile) against zarr's own reading and writing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

from cache.layout import CacheSpec, LayerSpec
from cache.shardfile import ShardEncoder
from cache.writer import CacheWriter


def _array(tmp_path, name, rows, row_shape, dtype, shard_rows, chunk_rows, compressor):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    return g.create_array(
        name, shape=(rows, *row_shape), dtype=dtype, chunks=(chunk_rows, *row_shape),
        shards=(shard_rows, *row_shape), compressors=[compressor, Crc32cCodec()], fill_value=0,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 70),
    row_shape=st.sampled_from([(), (3,), (2, 3, 2)]),
    dtype=st.sampled_from(["float16", "uint8", "float32"]),
    chunks_per_shard=st.integers(1, 4),
    chunk_rows=st.integers(1, 9),
    comp=st.sampled_from(["zstd", "blosc", "blosc-lz4"]),
    seed=st.integers(0, 2**31),
)
def test_shard_files_read_back_through_zarr(tmp_path_factory, rows, row_shape, dtype, chunks_per_shard,
                                            chunk_rows, comp, seed):
    tmp = tmp_path_factory.mktemp("shard")
    compressor = ZstdCodec(level=3) if comp == "zstd" else BloscCodec(
        cname="lz4" if comp == "blosc-lz4" else "zstd", clevel=3, shuffle="bitshuffle")
    shard_rows = chunk_rows * chunks_per_shard
    arr = _array(tmp, "a", rows, row_shape, dtype, shard_rows, chunk_rows, compressor)
    enc = ShardEncoder.for_array(arr, tmp / "g.zarr" / "a")
    assert enc is not None
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((rows, *row_shape)) * 50).astype(dtype)
    for s in range(-(-rows // shard_rows)):
        enc.write(s, data[s * shard_rows : (s + 1) * shard_rows])
    got = zarr.open_group(str(tmp / "g.zarr"), mode="r")["a"][:]
    np.testing.assert_array_equal(got, data)
    # zarr reads each inner chunk back through its crc32c: a flipped payload byte must be caught
    f = tmp / "g.zarr" / "a" / enc.key(0)
    raw = bytearray(f.read_bytes())
    raw[0] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="(?i)checksum"):
        zarr.open_group(str(tmp / "g.zarr"), mode="r")["a"][: min(rows, chunk_rows)]


def test_unknown_codecs_and_unsharded_arrays_are_left_to_zarr(tmp_path):
    gz = _array(tmp_path, "gz", 10, (2,), "float16", 4, 2, GzipCodec())
    assert ShardEncoder.for_array(gz, tmp_path / "g.zarr" / "gz") is None
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    plain = g.create_array("plain", shape=(10, 2), dtype="float16", chunks=(5, 2))
    assert ShardEncoder.for_array(plain, tmp_path / "g.zarr" / "plain") is None


def _spec(rows):
    return CacheSpec(rows=rows, rows_per_shard=8, num_classes=3, layers=[LayerSpec(0, "blocks.0", 4, 2, 2)],
                     chunk_bytes=64)


@pytest.mark.parametrize("fast", [True, False])
def test_writer_shards_equal_the_data_with_and_without_the_one_pass_path(tmp_path, monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(ShardEncoder, "for_array", classmethod(lambda cls, arr, d: None))
    spec = _spec(21)
    w = CacheWriter(tmp_path / "c.zarr", spec)
    w.create_or_resume({"fingerprint": "f"}, pa.table({"row": np.arange(21)}))
    rng = np.random.default_rng(0)
    data = {n: (rng.standard_normal((21, *shape)) * 10).astype(dt) for n, (shape, dt) in spec.arrays().items()}
    for s in range(spec.num_shards):
        a, b = spec.shard_rows(s)
        w.write_shard(s, {n: v[a:b] for n, v in data.items()}, [])
    assert w.completed() == {0, 1, 2}
    assert all((w._encoders[n] is not None) == fast for n in spec.arrays())
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    for n, v in data.items():
        np.testing.assert_array_equal(g[n][:], v, err_msg=n)
    assert not list((tmp_path / "c.zarr").rglob("*.tmp"))


def test_short_writes_are_continued(tmp_path, monkeypatch):
    """writev may write fewer bytes than asked (signals, quotas): the shard file must still be whole."""
    import os

    real_writev = os.writev
    calls = []

    def short(fd, buffers):
        calls.append(1)
        head = bytes(buffers[0])[:7]  # at most 7 bytes per call
        return real_writev(fd, [head])

    arr = _array(tmp_path, "a", 40, (3,), "float16", 16, 8, ZstdCodec(level=1))
    enc = ShardEncoder.for_array(arr, tmp_path / "g.zarr" / "a")
    data = np.random.default_rng(0).standard_normal((40, 3)).astype("float16")
    monkeypatch.setattr(os, "writev", short)
    for s in range(3):
        enc.write(s, data[16 * s : 16 * s + 16])
    monkeypatch.undo()
    assert len(calls) > 3 * 4
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "g.zarr"), mode="r")["a"][:], data)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 70),
    row_shape=st.sampled_from([(), (3,), (2, 3, 2)]),
    dtype=st.sampled_from(["float16", "uint8", "int8", "float32", "bool"]),
    chunks_per_shard=st.integers(1, 4),
    chunk_rows=st.integers(1, 9),
    comp=st.sampled_from(["zstd", "blosc", "blosc-lz4"]),
    writer=st.sampled_from(["zarr", "encoder"]),
    cut=st.tuples(st.integers(0, 69), st.integers(1, 70)),
    seed=st.integers(0, 2**31),
)
def test_one_pass_reads_equal_zarr_reads(tmp_path_factory, rows, row_shape, dtype, chunks_per_shard, chunk_rows,
                                         comp, writer, cut, seed):
    """ShardDecoder against zarr's own reading, over shapes, dtypes, codecs, files written by zarr or
    by ShardEncoder, and row ranges inside one shard or across several."""
    from cache.shardfile import ShardDecoder

    tmp = tmp_path_factory.mktemp("read")
    compressor = ZstdCodec(level=1) if comp == "zstd" else BloscCodec(
        cname="lz4" if comp == "blosc-lz4" else "zstd", clevel=1, shuffle="bitshuffle")
    shard_rows = chunk_rows * chunks_per_shard
    arr = _array(tmp, "a", rows, row_shape, dtype, shard_rows, chunk_rows, compressor)
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((rows, *row_shape)) * 50).astype(dtype)
    if writer == "zarr":  # opened as the cache's writer opens it: every shard file is written, zeros too
        with zarr.config.set({"array.write_empty_chunks": True}):
            arr = zarr.open_group(str(tmp / "g.zarr"), mode="r+")["a"]
        arr[:] = data
    else:
        enc = ShardEncoder.for_array(arr, tmp / "g.zarr" / "a")
        for s in range(-(-rows // shard_rows)):
            enc.write(s, data[s * shard_rows : (s + 1) * shard_rows])
    dec = ShardDecoder.for_array(arr, tmp / "g.zarr" / "a")
    assert dec is not None
    a = min(cut[0], rows - 1)
    b = min(rows, a + cut[1])
    want = zarr.open_group(str(tmp / "g.zarr"), mode="r")["a"][a:b]
    got = dec.read(a, b)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dec.read(0, rows), data)


def test_one_pass_read_names_the_shard_of_a_flipped_byte(tmp_path):
    from cache.shardfile import ShardCorrupt, ShardDecoder

    arr = _array(tmp_path, "a", 40, (4,), "float16", 16, 4, ZstdCodec(level=1))
    arr[:] = np.arange(160, dtype="float16").reshape(40, 4)
    dec = ShardDecoder.for_array(arr, tmp_path / "g.zarr" / "a")
    f = tmp_path / "g.zarr" / "a" / dec.key(1)
    raw = bytearray(f.read_bytes())
    for where in (0, len(raw) - 10):  # a chunk's payload, then the index
        bad = bytearray(raw)
        bad[where] ^= 0x01
        f.write_bytes(bytes(bad))
        with pytest.raises(ShardCorrupt, match=r"shard 1 .*checksum mismatch"):
            dec.read(16, 32)
        np.testing.assert_array_equal(dec.read(0, 16), arr[0:16])  # the other shards still read
    f.write_bytes(bytes(raw[:20]))  # truncated below its index
    with pytest.raises(ShardCorrupt, match="shard 1"):
        dec.read(20, 24)
    assert ShardDecoder.for_array(_array(tmp_path, "gz", 10, (2,), "float16", 4, 2, GzipCodec()),
                                  tmp_path / "g.zarr" / "gz") is None


def test_the_writer_writes_a_shard_of_zeros_through_zarr(tmp_path):
    """A shard whose rows all equal the fill value (zero logits; ``valid`` 0: every row of the shard
    bad) still gets its file, which zarr would skip, when an array goes through zarr's own assignment
    (codecs the one-pass encoder does not know)."""
    from cache.writer import CacheWriter

    spec = CacheSpec(rows=8, rows_per_shard=4, num_classes=3, layers=[LayerSpec(0, "blocks.0", 2, 2, 2)],
                     store=("logits",))
    w = CacheWriter(tmp_path / "c.zarr", spec)
    w.create_or_resume({"fingerprint": "f"}, pa.table({"key": ["k"] * 8}))
    w._encoders.update(logits=None, valid=None)  # the zarr path
    for s in range(2):
        w.write_shard(s, {"logits": np.zeros((4, 3), np.float16), "valid": np.zeros(4, np.uint8)}, [])
    for name in ("logits", "valid"):
        assert sorted(p.name for p in (tmp_path / "c.zarr" / name / "c").iterdir()) == ["0", "1"], name
    w.finalize({})
