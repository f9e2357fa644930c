"""Bytes per row of the cache's manifest under a view policy, planned and written as extract does.

    python benchmarks/manifest_bytes.py [--set KEY=VALUE ...]
    python benchmarks/manifest_bytes.py --set data.augment.auto_augment=rand-m9-mstd0.5-inc1 \\
        --set data.augment.re_prob=0.25 --set data.augment.mixup=0.8 --set data.augment.cutmix=1.0

Runs prepare on the default (or reuses it), plans the rows with their view parameters
(``stages.extract.plan_rows``) and writes the manifest to memory with extract's Parquet settings;
prints rows, columns, bytes after zstd and bytes per row, and the view columns' bytes per row in
memory.  No teacher runs: the manifest does not depend on it.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from _common import default_runner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from cache.manifest import manifest_table
    from stages.extract import plan_rows
    from stages.shards import load_index
    from stages.views import RA_OPS

    wd = args.workdir or tempfile.mkdtemp(prefix="bench-manifest-")
    cfg, runner = default_runner(wd, args.overrides)
    train, val, _ = load_index(runner.run("prepare")["prepare"])
    rows, blocks = plan_rows(cfg, train, val)
    table = manifest_table(rows, blocks, cfg.extract.rows_per_shard, Path(wd) / "cache.zarr", Path(wd),
                           codes={"ra_op": RA_OPS})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")  # as cache.writer writes it
    in_memory = sum(c.nbytes for c in rows.params.values()) / len(rows)
    print(f"{len(table)} rows ({cfg.extract.views} views), {len(table.column_names)} columns: "
          f"{buf.tell()} bytes, {buf.tell() / len(table):.2f} B per row after zstd")
    print(f"view columns {', '.join(rows.params)}: {in_memory:.0f} B per row in memory")


if __name__ == "__main__":
    main()
