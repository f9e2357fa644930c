"""Step time of cached SpectralKD distillation against no KD and against online distillation.

    python benchmarks/distill.py [--workdir DIR] [--repeat 5] [--epochs-per-round 3] [--set KEY=VALUE ...]
    python benchmarks/distill.py --set extract.compress.quantize=int8   # from an int8 cache
    python benchmarks/distill.py --cache-location s3://bench/caches     # and from a copy in a bucket

Builds the default pipeline up to extract (teacher not fitted: its weights do not change step
times), then trains the default student architecture as kind 'none', 'spectral' (cached) and
'spectral' (online).  Variants take turns in rounds of a few consecutive epochs each (an epoch of
the default is 23 steps, too short to time alone on a shared machine), and the script prints the
median per-step wall time of each (data loading included: round time / steps, evaluation
excluded) with the ratios, and the teacher/student forward FLOP ratio from torch's FLOP counter.
The first K epochs (K = views) read the teacher targets from disk; later ones from memory
(distill.defaults.keep_targets_mb).  Two more cached variants never hold targets (keep_targets_mb
0): one reads shard files in one pass (cache.shardfile.ShardDecoder, the default), one through
zarr, side by side.

With ``--cache-location URL`` the cache is also copied to that store location and two more
variants read it from there (targets kept in memory, and read every epoch), counted in requests:
GETs per epoch, and bytes read per row against the cache's stored bytes per row of the arrays the
student reads.  An ``s3://`` location without ``--storage-option endpoint_url=...`` gets a moto S3
server started on 127.0.0.1 with fake credentials (moto is in the dev extra).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import default_runner, machine


def flops(model, size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=5, help="rounds per variant")
    ap.add_argument("--epochs-per-round", type=int, default=3, help="consecutive epochs a variant trains per round")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cache-location", default=None, metavar="URL",
                    help="also read a copy of the cache from this store location (s3://bucket/prefix)")
    ap.add_argument("--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
                    help="an fsspec option for the store (endpoint_url=http://host:9000)")
    args = ap.parse_args()
    wd = args.workdir or tempfile.mkdtemp(prefix="bench-distill-")
    import numpy as np
    import torch

    from stages import models
    from stages.trainer import Trainer
    from cache.reader import open_cache

    cfg, runner = default_runner(wd, ["teacher.fit=null", *args.overrides])
    recs = runner.run("extract")
    cache = open_cache(recs["extract"])
    teacher = models.load_teacher(recs["teacher"], cfg).to(models.resolve_device(cfg.distill.defaults.device))
    spectral = next(s for s in cfg.distill.students if s.loss.kind == "spectral").name
    base = cfg.student(spectral)
    zarr_cache = open_cache(recs["extract"])
    zarr_cache.one_pass = False  # the same cache read through zarr: the one-pass reader's baseline
    disk = {"keep_targets_mb": 0}
    variants = {
        "none (cached rows, no KD)": base.model_copy(update={"loss": base.loss.model_copy(update={"kind": "none"})}),
        "spectral cached": base,
        "spectral online": base.model_copy(update={"mode": "online"}),
        "spectral cached, disk": base.model_copy(update=disk),
        "spectral cached, disk, zarr": base.model_copy(update=disk),
    }
    caches = {"spectral cached, disk, zarr": zarr_cache}
    if args.cache_location:
        remote = remote_copy(cache, args.cache_location, args.storage_options)
        variants["spectral cached, remote"] = base
        variants["spectral cached, disk, remote"] = base.model_copy(update=disk)
        caches.update({"spectral cached, remote": remote, "spectral cached, disk, remote": remote_copy(
            cache, args.cache_location, args.storage_options)})
    times: dict[str, list[float]] = {k: [] for k in variants}
    requests: dict[str, list] = {k: [] for k in variants if k.endswith("remote")}
    trainers = {name: Trainer(cfg, st, caches.get(name, cache), Path(wd) / "scratch",
                              runner.model_plan, teacher=teacher if st.mode == "online" else None)
                for name, st in variants.items()}
    opts = {name: torch.optim.AdamW(tr.model.parameters(), lr=tr.st.lr) for name, tr in trainers.items()}
    per = args.epochs_per_round
    for r in range(args.repeat):  # rounds interleaved across variants; epoch e trains on view e mod K
        for name, tr in trainers.items():
            tr.model.train()
            n = 0
            t = time.perf_counter()
            for epoch in range(r * per, (r + 1) * per):
                with counted(name in requests) as calls:
                    for x, y, _, tg in tr.train_batches(epoch):
                        tr.step(x, y, tg, opts[name])
                        n += 1
                if calls is not None:
                    requests[name].append((epoch, calls.count("GetObject"), calls.get_bytes,
                                           len(tr.train_labels(epoch))))
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / n)
    n //= per
    med = {k: float(np.median(v)) for k, v in times.items()}
    st_model = models.create(base.model, base.kwargs, cfg.data.num_classes)
    teacher = teacher.cpu()
    f_t, f_s = flops(teacher, cfg.data.image_size), flops(st_model, cfg.data.image_size)
    print(f"machine: {machine()}")
    print(f"student {base.model} {base.kwargs}, batch {base.batch_size}, pairs {base.pairs}; "
          f"teacher {cfg.teacher.model}; {n} steps per epoch, median of {args.repeat} rounds of {per} epochs")
    k_views = cache.view_count("train")
    for k, v in med.items():
        rounds = ", ".join(f"{1000 * x:.1f}" for x in times[k])
        print(f"  {k:<28}: {1000 * v:8.2f} ms/step  (per round: {rounds})")
    none_key = "none (cached rows, no KD)"
    ratio = [s / b for s, b in zip(times["spectral cached"], times[none_key])]
    cold_rounds = -(-k_views // per)  # rounds with an epoch whose view is read for the first time
    cold, warm = ratio[:cold_rounds], ratio[cold_rounds:]
    print(f"cached spectral / no KD      : {float(np.median(ratio)):.3f}   (median of per-round ratios; target 1.15)")
    print(f"  rounds reading targets from disk (first {k_views} epochs): {', '.join(f'{c:.3f}' for c in cold)}")
    if warm:
        print(f"  later rounds, targets in memory : median {float(np.median(warm)):.3f} of {len(warm)}")
    for k in ("spectral cached, disk", "spectral cached, disk, zarr"):
        r = [s / b for s, b in zip(times[k], times[none_key])]
        print(f"{k + ' / no KD':<29}: {float(np.median(r)):.3f}   (keep_targets_mb 0: every epoch reads the cache)")
    online = [o / c for o, c in zip(times["spectral online"], times["spectral cached"])]
    print(f"online spectral / cached     : {float(np.median(online)):.3f}   (median of per-round ratios)")
    if requests:
        report_remote(times, requests, cache, base, none_key, k_views)
    print(f"teacher / student fwd FLOPs  : {f_t / f_s:.2f}  ({f_t / 1e6:.1f} vs {f_s / 1e6:.1f} MFLOP per image)")
    snapshot_cost(trainers["spectral cached"], med["spectral cached"] * n, args.repeat * per)


def counted(active: bool):
    """The store requests of a block (a :class:`pipeline.storage.StoreCalls`), or None when not counted."""
    from contextlib import nullcontext

    from pipeline.storage import StoreCalls

    return StoreCalls() if active else nullcontext(None)


def remote_copy(cache, location: str, options: list[str]):
    """The cache copied to ``location`` (an s3:// one on a moto server started here when no endpoint is
    given), opened from there."""
    import yaml

    from cache.reader import Cache
    from pipeline import storage

    opts = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in options)}
    if location.startswith("s3://") and "endpoint_url" not in opts:
        opts["endpoint_url"] = local_s3()
    storage.configure(opts)
    url = f"{location.rstrip('/')}/{cache.attrs['fingerprint'][:12]}/cache.zarr"
    fs, path = storage.filesystem(url)
    if not fs.exists(path + "/zarr.json"):
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        fs.put(str(cache.path), path, recursive=True)
        # the manifest names the input tars relative to the cache: put them at the same place beside the copy
        from pipeline.fsutil import resolve_recorded

        for u in set(cache.manifest.column("url").to_pylist()):
            if "://" not in u and not u.startswith("/"):
                fs.put_file(resolve_recorded(u, cache.path), resolve_recorded(u, url))
    return Cache(url, expect_fingerprint=cache.attrs["fingerprint"])


_SERVER = []


def local_s3() -> str:
    """A moto S3 server on 127.0.0.1 with fake credentials, for the run's lifetime; its endpoint."""
    import logging
    import os
    import socket

    if not _SERVER:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        _SERVER.append(f"http://127.0.0.1:{port}")
        print(f"started a moto S3 server at {_SERVER[0]}")
    return _SERVER[0]


def report_remote(times: dict, requests: dict, cache, st, none_key: str, k_views: int) -> None:
    """GETs per epoch and bytes per row of the remote variants, and their step ratios beside the local ones."""
    import numpy as np

    arrays = ["logits", *(cache.spec.spectrum_parts(cache.layer(t)).values() for t in {p[1] for p in st.pairs})]
    names = [arrays[0], *(n for parts in arrays[1:] for n in parts)]
    files = cache.store.files()
    stored = sum(v for k, v in files.items() if k.split("/c/")[0] in names)
    per_row = stored / cache.spec.rows
    print(f"remote cache: {cache.spec.num_shards} shards x {len(names)} arrays read ({', '.join(names)}), "
          f"{per_row:.0f} stored bytes per row of them; GETs and bytes of this process (the target reads; "
          f"loader workers' image reads are their own)")
    for name, rows in requests.items():
        first = [r for r in rows if r[0] < k_views]
        later = [r for r in rows if r[0] >= k_views]
        for label, part in (("epochs reading a view first", first), ("later epochs", later)):
            if part:
                gets = np.mean([r[1] for r in part])
                bpr = np.mean([r[2] / max(1, r[3]) for r in part])
                print(f"  {name:<29} {label:<27}: {gets:7.1f} GETs/epoch, {bpr:8.0f} bytes read per row "
                      f"({bpr / per_row:.2f}x stored)")
        ratio = [s / b for s, b in zip(times[name], times[none_key])]
        local = name.replace(", remote", "")
        local_ratio = [s / b for s, b in zip(times[local], times[none_key])]
        print(f"  {name + ' / no KD':<40}: {float(np.median(ratio)):.3f}   (per round: "
              f"{', '.join(f'{r:.2f}' for r in ratio)}; local: {local} / no KD {float(np.median(local_ratio)):.3f}; "
              f"the S3 server shares this machine's cores)")


def snapshot_cost(tr, train_epoch_s: float, repeat: int) -> None:
    """What a dynamics snapshot adds to an epoch: the evaluation with layer statistics against the
    plain evaluation (training steps are untouched: snapshots run in the evaluation's forward pass)."""
    import numpy as np

    every = tr.st.snapshot_every
    times = {0: [], 1: []}
    for _ in range(repeat):
        for snap in (0, 1):  # interleaved
            tr.st.snapshot_every = snap
            t = time.perf_counter()
            tr.evaluate(0)
            times[snap].append(time.perf_counter() - t)
    tr.st.snapshot_every = every
    plain, snap = float(np.median(times[0])), float(np.median(times[1]))
    one = (train_epoch_s + snap) / (train_epoch_s + plain)
    n = max(1, every)
    print(f"snapshot epoch / plain epoch : {one:.3f}   (evaluation {1000 * plain:.0f} -> {1000 * snap:.0f} ms, "
          f"train {1000 * train_epoch_s:.0f} ms; per-step cost 0: statistics come from the evaluation's forward "
          f"pass); over snapshot_every={n}: {1 + (one - 1) / n:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
