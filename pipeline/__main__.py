"""Command line: ``python -m pipeline {run,status,verify,select-layers}``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import dist
from .config import ConfigError, check_models, load_config
from .errors import PipelineError
from .graph import STAGES, Runner, upstream_closure
from .locking import LockedError, WorkdirLock

log = logging.getLogger("pipeline")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", default=None, help="pipeline file (default: ./pipeline.yaml)")
    p.add_argument("--workdir", default=None, help="where outputs live (overrides workdir:)")
    p.add_argument("--upstream-workdir", dest="upstream_workdirs", action="append", default=None, metavar="DIR",
                   help="a read-only workdir whose up-to-date outputs serve this one (repeatable; overrides "
                        "upstream_workdirs:)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set teacher.fit.epochs=5 (enters fingerprints)",
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks on error")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="SpectralKD: run a teacher once, distill many students from its cache, analyze on Dask.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", parents=[common], help="run a stage after its stale upstream stages")
    r.add_argument("stage", choices=[*STAGES, "all"])
    r.add_argument("--force", action="store_true", help="rerun STAGE even if up to date")
    r.add_argument("--student", action="append", default=None, help="distill only this student (repeatable)")
    r.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for the workdir lock")
    sub.add_parser("status", parents=[common], help="show each stage: up to date / stale / missing")
    v = sub.add_parser("verify", parents=[common], help="check a stage's output against the config")
    v.add_argument("stage", nargs="?", default="extract", choices=["extract", "distill"])
    s = sub.add_parser("select-layers", parents=[common], help="propose teacher layers from intensities")
    s.add_argument("--k", type=int, default=4, help="how many layers to propose")
    s.add_argument("--method", choices=["top", "ends"], default="top")
    s.add_argument("--student-depth", type=int, default=None, help="student depth for the pairing")
    return p


def setup_logging(debug: bool) -> None:
    fmt = "%(asctime)s %(levelname)s %(message)s"
    if dist.world_size() > 1:
        fmt = f"%(asctime)s [rank {dist.rank()}] %(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, datefmt="%H:%M:%S")
    for noisy in ("distributed", "asyncio", "matplotlib", "PIL", "numcodecs", "zarr", "fsspec", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_status(runner: Runner) -> None:
    for st in runner.status():
        line = f"{st.stage:<8} {st.status:<11} {st.fingerprint[:12]}"
        if st.reasons:
            shown = st.reasons[:8]
            more = f" (+{len(st.reasons) - 8} more)" if len(st.reasons) > 8 else ""
            line += "  " + "; ".join(shown) + more
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr (exit 2 for config and input problems)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        cfg = load_config(args.config, args.overrides, args.workdir)
        if args.upstream_workdirs:
            cfg.upstream_workdirs = args.upstream_workdirs
        return COMMANDS[args.command](cfg, args)
    except (ConfigError, PipelineError, LockedError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed work is kept; rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def cmd_status(cfg, args) -> int:
    _print_status(Runner(cfg))
    return 0


def cmd_run(cfg, args) -> int:
    """Run a stage after its stale upstream stages, under the workdir lock when there is work."""
    t0 = time.time()
    for name in args.student or []:
        cfg.student(name)  # an unknown name fails even when everything is up to date
    runner = Runner(cfg, {"students": args.student})
    stages = STAGES if args.stage == "all" else upstream_closure(args.stage)
    # models are checked before any work; with nothing to do there is nothing to check or lock
    # (so an up-to-date workdir that is read-only for this user still answers)
    work = args.force or any(runner.state(s).status != "up to date" for s in stages)
    if work:
        check_models(cfg)
    dist.init()
    if not work:
        runner.run(args.stage)
    elif dist.is_main():
        with WorkdirLock(cfg.workdir, f"run {args.stage}", wait=args.wait):
            dist.barrier()
            runner.run(args.stage, force=args.force)
    else:
        dist.barrier()
        runner.run(args.stage, force=args.force)
    if dist.is_main():
        log.info(f"finished in {time.time() - t0:.1f}s")
    return 0


def cmd_verify(cfg, args) -> int:
    from cache.verify import verify_stage

    check_models(cfg)
    problems = verify_stage(Runner(cfg), args.stage)
    for p in problems:
        print(p)
    if problems:
        print(f"verify {args.stage}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"verify {args.stage}: ok")
    return 0


def cmd_select_layers(cfg, args) -> int:
    check_models(cfg)
    if args.k < 1:
        raise ConfigError(f"select-layers --k: {args.k}; propose at least 1 layer")
    if args.student_depth is not None and args.student_depth < 1:
        raise ConfigError(f"select-layers --student-depth: {args.student_depth}; a depth is at least 1")
    from stages.analyze import select_layers_cli

    with WorkdirLock(cfg.workdir, "select-layers"):  # it may run analyze first
        print(select_layers_cli(Runner(cfg), args.k, args.method, args.student_depth))
    return 0


COMMANDS = {"status": cmd_status, "run": cmd_run, "verify": cmd_verify, "select-layers": cmd_select_layers}


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    sys.exit(main())
