"""Command line: ``python -m pipeline {run,status,verify,select-layers}``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import dist
from typing import TYPE_CHECKING

from .errors import ConfigError, PipelineError
from .fsutil import atomic_write_text
from .locking import LockedError
from .nodes import DEFAULT_CONFIG, STAGES, STUDENT, TIER, student_name, tier_name

if TYPE_CHECKING:  # the config and the graph import torch (a loss's config): init and recipes need neither
    from .graph import Runner

log = logging.getLogger("pipeline")


_AFTER = "_after_command"  # repeatable options given after the command's name, appended in parse_args


def _dest(name: str, defaults: bool) -> str:
    return name if defaults else name + _AFTER


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, repeatable options collected from both sides of the command's name."""
    args = build_parser().parse_args(argv)
    for name in ("upstream_workdirs", "overrides"):
        after = vars(args).pop(name + _AFTER, None)
        if after:
            setattr(args, name, (getattr(args, name) or []) + after)
    return args


def _common(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command's name.  The top-level parser
    holds the defaults; a command's parser sets only what is given after its name, so
    ``-c F run`` and ``run -c F`` mean the same."""

    def default(v):
        return v if defaults else argparse.SUPPRESS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", default=default(None), help="pipeline file (default: ./pipeline.yaml)")
    p.add_argument("--workdir", default=default(None), help="where outputs live (overrides workdir:)")
    p.add_argument("--upstream-workdir", dest=_dest("upstream_workdirs", defaults), action="append",
                   default=default(None),
                   metavar="DIR", help="a read-only workdir whose up-to-date outputs serve this one (repeatable; "
                                       "overrides upstream_workdirs:)")
    p.add_argument(
        "--set",
        dest=_dest("overrides", defaults),
        action="append",
        default=default([]),
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set teacher.fit.epochs=5 (enters fingerprints)",
    )
    p.add_argument("--debug", action="store_true", default=default(False), help="full tracebacks on error")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    p = argparse.ArgumentParser(
        prog="spectralkd",
        description="SpectralKD: run a teacher once, distill many students from its cache, analyze on Dask.",
        parents=[_common(defaults=True)],
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", parents=[common], help="run a stage after its stale upstream stages")
    r.add_argument("stage", help=f"{' | '.join(STAGES)} | all | distill/<student> | tier/<tier>")
    r.add_argument("--force", action="store_true", help="rerun STAGE even if up to date")
    r.add_argument("--student", action="append", default=None, help="distill only this student (repeatable)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N students at once as separate processes (CPU cores or GPUs split between them)")
    r.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait for an output another run is building")
    sub.add_parser("status", parents=[common], help="show each stage and student: up to date / stale / missing")
    v = sub.add_parser("verify", parents=[common], help="check a stage's output against the config")
    v.add_argument("stage", nargs="?", default="extract", help="extract | distill | distill/<student>")
    i = sub.add_parser("init", parents=[common], help="write the embedded default (or a recipe) as ./pipeline.yaml")
    i.add_argument("--recipe", default="default", help="a shipped recipe (see `recipes`)")
    i.add_argument("--force", action="store_true", help="replace an existing file")
    sub.add_parser("recipes", parents=[common], help="list the shipped recipes")
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
    states = runner.status()
    width = max(8, *(len(st.stage) for st in states))
    for st in states:
        line = f"{st.stage:<{width}} {st.status:<11} {st.fingerprint[:12]}"
        if st.reasons:
            shown = st.reasons[:8]
            more = f" (+{len(st.reasons) - 8} more)" if len(st.reasons) > 8 else ""
            line += "  " + "; ".join(shown) + more
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr (exit 2 for config and input problems).  SIGTERM
    stops it as Ctrl-C does (exit 130, completed work kept)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    args = parse_args(argv)
    setup_logging(args.debug)
    on_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    previous = signal.signal(signal.SIGTERM, interrupt) if on_main_thread else None
    try:
        if args.command in CONFIG_FREE:
            return COMMANDS[args.command](None, args)
        from .config import load_config

        cfg = load_config(args.config, args.overrides, args.workdir, args.upstream_workdirs)
        return COMMANDS[args.command](cfg, args)
    except (ConfigError, PipelineError, LockedError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed work is kept; rerun to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout has gone (``spectralkd recipes | head``): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def cmd_status(cfg, args) -> int:
    from .graph import Runner

    _print_status(Runner(cfg))
    return 0


def _check_target(target: str, cfg) -> None:
    if target in (*STAGES, "all"):
        return
    if target.startswith(STUDENT):
        cfg.student(target[len(STUDENT):])
        return
    if target.startswith(TIER):
        cfg.tier(target[len(TIER):])
        return
    raise ConfigError(f"run: {target!r} is not a stage ({', '.join(STAGES)}, all), distill/<student> or tier/<tier>")


def cmd_run(cfg, args) -> int:
    """Run a node after its stale upstream nodes; each output is built under its own lock."""
    from .graph import Runner

    t0 = time.time()
    _check_target(args.stage, cfg)
    for name in args.student or []:
        cfg.student(name)  # an unknown name fails even when everything is up to date
    if args.jobs < 1:
        raise ConfigError(f"run --jobs: {args.jobs}; at least 1")
    runner = Runner(cfg, {"students": args.student, "wait": args.wait})
    # models are checked before any work; with nothing to do there is nothing to check
    # (so an up-to-date workdir that is read-only for this user still answers)
    work = args.force or any(runner.state(n).status != "up to date" for n in runner.plan(args.stage))
    if work:
        runner.check_models()
    dist.init()
    forced = runner.forced_nodes(args.stage) if args.force else set()
    if work and _fans_out(cfg, args):
        forced -= _fan_out(cfg, args, runner, forced)
    runner.run(args.stage, forced=forced)
    if dist.is_main():
        log.info(f"finished in {time.time() - t0:.1f}s")
    return 0


def _fans_out(cfg, args) -> bool:
    """Whether students train as separate processes (``--jobs`` > 1 or ``distill.scheduler``)."""
    return (args.stage in ("distill", "analyze", "all") and dist.world_size() == 1
            and (args.jobs > 1 or bool(cfg.distill.scheduler)))


def _fan_out(cfg, args, runner: Runner, forced: set[str]) -> set[str]:
    """Build what the students need here, then train the stale (or forced) students as separate
    processes; returns the student nodes they built."""
    from .fanout import check_outcomes, run_dask, run_local

    runner.run("extract", forced=forced & set(runner.plan("extract")))
    for tier in [n for n in runner.plan(args.stage) if tier_name(n) is not None]:  # the caches students read
        runner.run(tier, forced=forced & {tier})
    nodes = [STUDENT + n for n in runner.students()]
    todo = [n for n in nodes if n in forced or runner.state(n).status != "up to date"]
    if not todo:
        return set()
    names = [student_name(n) for n in todo]
    force = {student_name(n): n in forced for n in todo}
    scratch = None
    if not cfg.distill.shared_workdir:  # workers share only the store: students train in scratch workdirs
        from .scratch import ScratchStudents

        scratch = ScratchStudents(runner, args)
    if cfg.distill.scheduler:
        log.info(f"distill: {len(names)} student(s) to the Dask scheduler at {cfg.distill.scheduler}")
        outcomes = run_dask(args, names, cfg.distill.scheduler, force, scratch=scratch)
    else:
        outcomes = run_local(args, names, min(args.jobs, len(names)), force, scratch=scratch)
    check_outcomes(outcomes)
    return set(todo)


def cmd_verify(cfg, args) -> int:
    from .graph import Runner

    from cache.verify import verify_stage

    runner = Runner(cfg)
    runner.check_models()
    problems = verify_stage(runner, args.stage)
    for p in problems:
        print(p)
    if problems:
        print(f"verify {args.stage}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"verify {args.stage}: ok")
    return 0


def cmd_select_layers(cfg, args) -> int:
    from .graph import Runner, stage_function

    runner = Runner(cfg)
    runner.check_models()
    if args.k < 1:
        raise ConfigError(f"select-layers --k: {args.k}; propose at least 1 layer")
    if args.student_depth is not None and args.student_depth < 1:
        raise ConfigError(f"select-layers --student-depth: {args.student_depth}; a depth is at least 1")
    select_layers = stage_function("analyze", "select_layers_cli")
    print(select_layers(runner, args.k, args.method, args.student_depth))  # may run analyze first
    return 0


def cmd_init(cfg, args) -> int:
    """Write the embedded default, or a shipped recipe, as a pipeline file to start from."""
    from .recipes import recipe_text

    dest = Path(args.config or DEFAULT_CONFIG)
    text = recipe_text(args.recipe)
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest}: already exists; pass --force to replace it, or -c OTHER.yaml")
    atomic_write_text(dest, text)
    print(f"wrote {dest} (recipe {args.recipe}); next: spectralkd status -c {dest}, spectralkd run all -c {dest}")
    return 0


def cmd_recipes(cfg, args) -> int:
    """List the shipped recipes with the first line of each one's header."""
    from .recipes import recipe_summaries

    for name, summary in recipe_summaries():
        print(f"{name:<36} {summary}")
    return 0


COMMANDS = {"status": cmd_status, "run": cmd_run, "verify": cmd_verify, "select-layers": cmd_select_layers,
            "init": cmd_init, "recipes": cmd_recipes}
CONFIG_FREE = ("init", "recipes")  # commands that need no pipeline file


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    sys.exit(main())
