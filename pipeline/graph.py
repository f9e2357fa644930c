"""The stage graph: prepare -> teacher -> extract -> distill -> analyze.

A stage is its parameters (the config values that decide its output), its upstream stages, its
outputs and a command, as in DVC.  Its fingerprint hashes the canonical JSON of its parameters,
its identity inputs (a checkpoint's digest, an input shard list), its upstream fingerprints and the
major versions of the libraries that write its output.  Outputs live in
``<workdir>/<stage>/<fingerprint[:12]>/`` with a ``lock.json`` recording what ran; an output whose
lock matches the current fingerprint is reused, never recomputed.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import dist
from .config import PipelineConfig, decisive
from .fingerprint import diff, file_digest, fingerprint, library_versions
from .fsutil import atomic_write_json, fresh_dir, read_json, replace_dir

log = logging.getLogger("pipeline")

STAGES = ("prepare", "teacher", "extract", "distill", "analyze")


def _prepare_params(cfg: PipelineConfig) -> dict:
    d = cfg.data
    return {
        "seed": cfg.seed,
        "data": {
            "source": d.source,
            "root": d.root,
            "image_size": d.image_size,
            "val_fraction": d.val_fraction,
            "samples_per_shard": d.samples_per_shard,
            "train_shards": d.train_shards,
            "val_shards": d.val_shards,
        },
    }


def _prepare_identity(cfg: PipelineConfig) -> dict:
    from stages.prepare import source_identity

    return source_identity(cfg)


def _preprocess(cfg: PipelineConfig) -> dict:
    d = cfg.data
    return {
        "num_classes": d.num_classes,
        "mean": list(d.mean),
        "std": list(d.std),
        "augment": d.augment.model_dump(mode="json"),
        "on_bad_sample": d.on_bad_sample,
    }


def _teacher_params(cfg: PipelineConfig) -> dict:
    return {"seed": cfg.seed, "teacher": decisive(cfg.teacher), "data": _preprocess(cfg)}


def _teacher_identity(cfg: PipelineConfig) -> dict:
    ck = cfg.teacher.checkpoint
    if not ck:
        return {}
    try:
        return {"checkpoint_sha256": file_digest(ck)}
    except OSError as e:
        from .config import ConfigError

        raise ConfigError(f"teacher.checkpoint: {ck!r} cannot be read ({e.strerror})") from None


def _extract_params(cfg: PipelineConfig) -> dict:
    from cache.layout import FORMAT_VERSION

    return {
        "cache_format": FORMAT_VERSION,
        "seed": cfg.seed,
        "extract": decisive(cfg.extract),
        "data": _preprocess(cfg),
    }


def student_params(cfg: PipelineConfig, name: str) -> dict:
    return decisive(cfg.student(name))


def _distill_params(cfg: PipelineConfig) -> dict:
    return {"students": {s.name: student_params(cfg, s.name) for s in cfg.distill.students}}


def _analyze_params(cfg: PipelineConfig) -> dict:
    return {"analyze": decisive(cfg.analyze)}


def _prepare_problems(runner: "Runner", out: Path, lock: dict) -> list[str]:
    from stages.prepare import output_problems

    return output_problems(out, lock)


def _files_problems(*names: str) -> Callable[["Runner", Path, dict], list[str]]:
    def check(runner: "Runner", out: Path, lock: dict) -> list[str]:
        return [f"{out / n} is missing" for n in names if not (out / n).exists()]

    return check


def failed_students(runner: "Runner") -> list[str]:
    """One line per student whose last training failed (its ``failed.json``)."""
    out = []
    for s in runner.cfg.distill.students:
        f = runner.student_dir(s.name) / "failed.json"
        if f.exists():
            try:
                why = read_json(f).get("error", "")
            except (OSError, ValueError):
                why = "unreadable failed.json"
            out.append(f"student {s.name} failed ({why}); the next run retries it")
    return out


def _distill_problems(runner: "Runner", out: Path, lock: dict) -> list[str]:
    problems = failed_students(runner)
    for s in runner.cfg.distill.students:
        d = runner.student_dir(s.name)
        try:
            done = read_json(d / "lock.json")
        except (OSError, ValueError):
            done = {}
        ok = done.get("complete") and done.get("fingerprint") == runner.student_fingerprint(s.name)[0]
        if not ok or not (d / "final.pt").exists() or not (d / "metrics.parquet").exists():
            problems.append(f"student {s.name} has no complete output in {d}")
    return problems


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    params: Callable[[PipelineConfig], dict]
    identity: Callable[[PipelineConfig], dict] = lambda cfg: {}
    module: str = ""
    distributed: bool = False  # every rank runs it (else rank 0 does, the others wait)
    # what is wrong with a completed output on disk now (a deleted file...): a damaged output is stale
    problems: Callable[["Runner", Path, dict], list[str]] = lambda runner, out, lock: []


GRAPH: dict[str, Stage] = {
    "prepare": Stage("prepare", (), _prepare_params, _prepare_identity, "stages.prepare",
                     problems=_prepare_problems),
    "teacher": Stage("teacher", ("prepare",), _teacher_params, _teacher_identity, "stages.teacher",
                     problems=_files_problems("model.pt")),
    "extract": Stage("extract", ("teacher",), _extract_params, module="stages.extract", distributed=True,
                     problems=_files_problems("cache.zarr/zarr.json", "cache.zarr/manifest.parquet",
                                              "cache.zarr/shards.parquet")),
    "distill": Stage("distill", ("extract",), _distill_params, module="stages.distill", distributed=True,
                     problems=_distill_problems),
    "analyze": Stage("analyze", ("distill",), _analyze_params, module="stages.analyze",
                     problems=_files_problems("report.md")),
}


def upstream_closure(name: str) -> list[str]:
    """``name`` and every stage it depends on, in run order."""
    order: list[str] = []

    def visit(n: str) -> None:
        for u in GRAPH[n].upstream:
            visit(u)
        if n not in order:
            order.append(n)

    visit(name)
    return order


def downstream_of(name: str) -> list[str]:
    return [s for s in STAGES if name in upstream_closure(s) and s != name]


@dataclass
class Record:
    """A completed stage output: its folder and lock."""

    stage: str
    path: Path
    lock: dict

    @property
    def summary(self) -> dict:
        return self.lock.get("summary", {})


@dataclass
class Context:
    """What a stage's ``run`` receives."""

    cfg: PipelineConfig
    stage: str
    fingerprint: str
    inputs: dict
    out: Path
    upstream: dict[str, Record]
    runner: "Runner"
    options: dict = field(default_factory=dict)
    forced: bool = False  # --force: recompute, do not resume partial output


@dataclass
class State:
    stage: str
    status: str  # "up to date" | "stale" | "missing"
    fingerprint: str
    reasons: list[str]


class Runner:
    def __init__(self, cfg: PipelineConfig, options: dict | None = None):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir)
        # read-only workdirs whose up-to-date outputs serve this one (a lab's shared cache)
        self.upstream_workdirs = [Path(w) for w in cfg.upstream_workdirs]
        self.options = options or {}
        self._fp: dict[str, tuple[str, dict]] = {}
        self._model_plan = None
        self.versions = library_versions()

    # ------------------------------------------------------------ fingerprints
    def inputs(self, name: str) -> dict:
        return self.fingerprint_of(name)[1]

    def fingerprint_of(self, name: str) -> tuple[str, dict]:
        if name not in self._fp:
            st = GRAPH[name]
            inputs = {
                "stage": name,
                "params": st.params(self.cfg),
                "identity": {**st.identity(self.cfg), **self._upstream_identity(name)},
                "upstream": {u: self.fingerprint_of(u)[0] for u in st.upstream},
                "versions": self.versions,
            }
            self._fp[name] = (fingerprint(inputs), inputs)
        return self._fp[name]

    def _upstream_identity(self, name: str) -> dict:
        """Identity that only an upstream run knows: the digest of the teacher's weights.

        A refit teacher (``run teacher --force``, or a fit that is not bit-stable) gives new weights
        under the same config; the cache made from the old weights must then be stale.
        """
        if name != "extract":
            return {}
        rec = self.record("teacher")
        return {"teacher_weights_sha256": rec.summary.get("weights_sha256") if rec else None}

    def student_fingerprint(self, name: str) -> tuple[str, dict]:
        inputs = {
            "student": student_params(self.cfg, name),
            "upstream": {
                "teacher": self.fingerprint_of("teacher")[0],
                "extract": self.fingerprint_of("extract")[0],
            },
            "versions": self.versions,
        }
        return fingerprint(inputs), inputs

    def out_dir(self, name: str, fp: str | None = None) -> Path:
        fp = fp or self.fingerprint_of(name)[0]
        return self.workdir / name / fp[:12]

    @property
    def model_plan(self):
        """The config's models resolved once (:func:`stages.models.plan_models`)."""
        if self._model_plan is None:
            from stages.models import plan_models

            self._model_plan = plan_models(self.cfg)
        return self._model_plan

    def student_dir(self, name: str, own: bool = False) -> Path:
        """Where student ``name`` lives: this workdir's folder, unless only an upstream workdir holds
        a finished one (``own``: this workdir's folder, where a run writes)."""
        leaf = Path("distill") / "students" / f"{name}-{self.student_fingerprint(name)[0][:12]}"
        for wd in [] if own else self.upstream_workdirs:
            if not (self.workdir / leaf / "lock.json").exists() and (wd / leaf / "lock.json").exists():
                return wd / leaf
        return self.workdir / leaf

    # ------------------------------------------------------------ state
    def record(self, name: str) -> Record | None:
        return self.checked_record(name)[0]

    def checked_record(self, name: str) -> tuple[Record | None, list[str]]:
        """The completed output of ``name`` for the current config, in this workdir or else in an
        upstream workdir, or None and what is wrong with this workdir's (a damaged output is stale)."""
        rec, damage = self._checked_record_in(name, self.workdir)
        for wd in self.upstream_workdirs:
            if rec is not None:
                break
            rec = self._checked_record_in(name, wd)[0]
        return rec, damage if rec is None else []

    def _checked_record_in(self, name: str, workdir: Path) -> tuple[Record | None, list[str]]:
        out = workdir / name / self.fingerprint_of(name)[0][:12]
        lock = out / "lock.json"
        if not lock.exists():
            return None, []
        try:
            data = read_json(lock)
        except (OSError, ValueError):
            return None, [f"{lock} cannot be read"]
        if data.get("fingerprint") != self.fingerprint_of(name)[0] or not data.get("complete"):
            return None, []
        problems = GRAPH[name].problems(self, out, data)
        if problems:
            return None, [f"output damaged: {p}" for p in problems]
        return Record(name, out, data), []

    def state(self, name: str) -> State:
        fp, inputs = self.fingerprint_of(name)
        rec, damage = self.checked_record(name)
        if rec is not None:
            elsewhere = [] if rec.path == self.out_dir(name) else [f"in {rec.path}"]
            return State(name, "up to date", fp, elsewhere)
        if damage:
            return State(name, "stale", fp, damage)
        latest = self.workdir / name / "latest.json"
        if latest.exists():
            try:
                old = read_json(latest)
            except (OSError, ValueError):
                old = {}
            changed = diff(old.get("inputs", {}), inputs)
            changed = [c for c in changed if not c.startswith("upstream.")] + [
                f"upstream {c.split('.', 1)[1]} changed" for c in changed if c.startswith("upstream.")
            ]
            notes = failed_students(self) if name == "distill" else []
            return State(name, "stale", fp, notes + (changed or ["output incomplete"]))
        return State(name, "missing", fp, (failed_students(self) if name == "distill" else []) or ["never run"])

    def status(self) -> list[State]:
        return [self.state(s) for s in STAGES]

    # ------------------------------------------------------------ running
    def run(self, target: str, force: bool = False) -> dict[str, Record]:
        targets = list(STAGES) if target == "all" else upstream_closure(target)
        last = STAGES[-1] if target == "all" else target
        done: dict[str, Record] = {}
        for name in targets:
            forced = force and name == last
            rec = None if forced else self.record(name)
            if rec is not None:
                if dist.is_main():
                    log.info(f"{name}: up to date ({rec.lock['fingerprint'][:12]}), skipped")
                done[name] = rec
                continue
            done[name] = self._run_stage(name, done, forced)
            for d in downstream_of(name):  # their fingerprints may include what this run produced
                self._fp.pop(d, None)
        return done

    def _run_stage(self, name: str, done: dict[str, Record], forced: bool = False) -> Record:
        """Run one stage into its output folder.  Under --force the new output is built beside the
        old one (``<fp>.force``) and replaces it only once complete (:func:`fsutil.replace_dir`)."""
        st = GRAPH[name]
        fp, inputs = self.fingerprint_of(name)
        final = self.out_dir(name, fp)
        out = final.with_name(final.name + ".force") if forced else final
        upstream = {u: done[u] if u in done else self.record(u) for u in upstream_closure(name)[:-1]}
        ctx = Context(self.cfg, name, fp, inputs, out, upstream, self, self.options, forced)
        mod = importlib.import_module(st.module)
        if dist.is_main():
            log.info(f"{name}: running ({fp[:12]}) -> {final}")
        t0 = time.time()
        if st.distributed or dist.is_main():
            if dist.is_main():
                fresh_dir(out) if forced else out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            summary = mod.run(ctx) or {}
        else:
            summary = {}
        dist.barrier()
        wall = time.time() - t0
        lock = {
            "stage": name,
            "fingerprint": fp,
            "inputs": inputs,
            "config": self.cfg.model_dump(mode="json"),
            "versions": self.versions,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(wall, 3),
            "summary": summary,
            "complete": summary.get("complete", True) if isinstance(summary, dict) else True,
        }
        if dist.is_main():
            atomic_write_json(out / "lock.json", lock)
            if out != final:
                replace_dir(out, final)
            if lock["complete"]:
                atomic_write_json(self.workdir / name / "latest.json", lock)
            log.info(f"{name}: done in {wall:.1f}s")
        dist.barrier()
        if not dist.is_main():
            lock = read_json(final / "lock.json")
        return Record(name, final, lock)
