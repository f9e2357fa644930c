"""The stage graph: prepare -> teacher -> extract -> distill -> analyze.

A stage is its parameters (the config values that decide its output), its upstream stages, its
outputs and a command, as in DVC.  Its fingerprint hashes the canonical JSON of its parameters,
its identity inputs (a checkpoint's digest, an input shard list), its upstream fingerprints and the
major versions of the libraries that write its output.  Outputs live in
``<workdir>/<stage>/<fingerprint[:12]>/`` with a ``lock.json`` recording what ran; an output whose
lock matches the current fingerprint is reused, never recomputed.

Each student is a node ``distill/<name>`` of the graph (upstream: extract), with its own
fingerprint, folder ``<workdir>/distill/students/<name>-<fingerprint[:12]>/``, record, status,
verify and ``--force``; the ``distill`` node is the summary over every student.  A run holds the
lock of the output it builds (``pipeline.locking``) and shared locks on the outputs it reads, so
different students train at once in one workdir while no output is ever written by two runs.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import dist, storage
from .config import PipelineConfig
from .schema import decisive
from .fingerprint import diff, file_digest, fingerprint, library_versions
from .errors import PipelineError
from .fsutil import atomic_write_json, fresh_dir, read_json, replace_dir
from .locking import OutputLock, describe_holder, held_by
from .nodes import FAILED, STAGES, tier_name, tier_node, student_name, student_node

log = logging.getLogger("pipeline")

SUMMARY_WAIT_S = 600.0  # how long a run waits for another writing the distill summary


def cache_node(cfg: PipelineConfig, student: str) -> str:
    """The node whose cache a student reads: ``tier/<name>`` when it names a tier, else extract."""
    tier = getattr(cfg.student(student), "tier", None)
    return tier_node(tier) if tier else "extract"


# What decides each stage's output: whole config sections, every field of them (``decisive``: all but
# the fields declared ``operational`` in pipeline/config.py).  A field of those sections that a stage
# never reads is left out here, and only here, with the reason; no other list of fields exists, so a
# field added to the schema enters the fingerprints by itself.
SECTIONS = {
    "prepare": ("seed", "data"),
    "teacher": ("seed", "data", "teacher"),
    "extract": ("seed", "data", "extract"),
    "analyze": ("analyze",),
}
NOT_READ = {
    "prepare": {
        # prepare writes and indexes the source's images and labels; these fields shape the views and
        # the training that later stages do, and enter their fingerprints (a new augmentation must not
        # rescan every input shard)
        "data.num_classes": "checked against the labels by the teacher and extract, not by prepare",
        "data.mean": "normalization of views: teacher fit, extract, students",
        "data.std": "normalization of views: teacher fit, extract, students",
        "data.augment": "the train-view policy: teacher fit, extract, fresh views",
        "data.eval": "the eval-view policy: teacher evaluation, extract's val rows",
        "data.on_bad_sample": "prepare records every sample it cannot index; later stages skip or fail on them",
    },
}


STUDENT_DIGESTS = "identity.students_sha256."


def _students_named(changed: list[str], names: list[str]) -> list[str]:
    """Changed input keys with the file digests of student ``n`` (the summary's and analyze's
    identity) read as one reason, 'student n changed'."""
    out = []
    for c in changed:
        owner = next((n for n in sorted(names, key=len, reverse=True)
                      if c == STUDENT_DIGESTS + n or c.startswith(f"{STUDENT_DIGESTS}{n}.")), None)
        reason = c if owner is None else f"student {owner} changed (trained again, damaged or not built)"
        if reason not in out:
            out.append(reason)
    return out


def section_params(cfg: PipelineConfig, stage: str) -> dict:
    """The parameters of ``stage``: the decisive values of its sections, less what it never reads."""
    tree = decisive(cfg)
    params = {name: tree[name] for name in SECTIONS[stage]}
    for path in NOT_READ.get(stage, {}):
        section, key = path.split(".", 1)
        params[section] = {k: v for k, v in params[section].items() if k != key}
    return params


def _prepare_params(cfg: PipelineConfig) -> dict:
    return section_params(cfg, "prepare")


def _prepare_identity(cfg: PipelineConfig) -> dict:
    from stages.prepare import source_identity

    return source_identity(cfg)


def _teacher_params(cfg: PipelineConfig) -> dict:
    return section_params(cfg, "teacher")


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

    return {"cache_format": FORMAT_VERSION, **section_params(cfg, "extract")}


def student_params(cfg: PipelineConfig, name: str) -> dict:
    return decisive(cfg.student(name))


def _distill_params(cfg: PipelineConfig) -> dict:
    """The summary's: every student, and the sweeps (their references decide the comparisons)."""
    return {"students": {s.name: student_params(cfg, s.name) for s in cfg.distill.students},
            "sweep": [decisive(sw) for sw in cfg.distill.sweep]}


def _tier_params(cfg: PipelineConfig, name: str) -> dict:
    """A tier's: its own section and the cache format (its upstream, extract, brings the rest)."""
    from cache.layout import FORMAT_VERSION

    return {"cache_format": FORMAT_VERSION, "tier": decisive(cfg.tier(name))}


def _analyze_params(cfg: PipelineConfig) -> dict:
    return section_params(cfg, "analyze")


def _prepare_problems(runner: "Runner", out: Path, lock: dict) -> list[str]:
    from stages.prepare import output_problems

    return output_problems(out, lock)


def _module_problems(module: str) -> Callable[["Runner", Path, dict], list[str]]:
    """The ``output_problems(runner, out, lock)`` of a stage module: its files against the digests
    its record holds."""
    def check(runner: "Runner", out: Path, lock: dict) -> list[str]:
        return importlib.import_module(module).output_problems(runner, out, lock)

    return check


def _files_problems(*names: str) -> Callable[["Runner", Path, dict], list[str]]:
    def check(runner: "Runner", out: Path, lock: dict) -> list[str]:
        return [f"{out / n} is missing" for n in names if not (out / n).exists()]

    return check


def failure_path(runner: "Runner", node: str) -> Path:
    """Where the last failed build of ``node`` is recorded (``failed.json`` in its output folder)."""
    student = student_name(node)
    return (runner.student_dir(student) if student is not None else runner.out_dir(node)) / FAILED


def failure_of(runner: "Runner", node: str) -> str | None:
    """Why the last build of ``node`` (a stage, or a student ``distill/<name>``) failed, or None."""
    f = failure_path(runner, node)
    if not f.exists():
        return None
    try:
        return read_json(f).get("error", "") or "no reason recorded"
    except (OSError, ValueError):
        return "unreadable failed.json"


def failed_students(runner: "Runner") -> list[str]:
    """One line per student whose last training failed."""
    return [f"student {s.name} failed ({why}); the next run retries it"
            for s in runner.cfg.distill.students if (why := failure_of(runner, student_node(s.name))) is not None]


def _distill_problems(runner: "Runner", out: Path, lock: dict) -> list[str]:
    problems = _files_problems("summary.parquet", "summary.md")(runner, out, lock)
    for s in runner.cfg.distill.students:
        rec, damage = runner.checked_record(student_node(s.name))
        if rec is None:
            why = f" ({'; '.join(damage)})" if damage else ""
            problems.append(f"student {s.name} has no complete output in {runner.student_dir(s.name)}{why}")
    return problems


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    params: Callable[[PipelineConfig], dict]
    identity: Callable[[PipelineConfig], dict] = lambda cfg: {}
    module: str = ""
    entry: str = "run"  # the module's function that builds the output
    distributed: bool = False  # every rank runs it (else rank 0 does, the others wait)
    # what is wrong with a completed output on disk now (a deleted file...): a damaged output is stale
    problems: Callable[["Runner", Path, dict], list[str]] = lambda runner, out, lock: []


GRAPH: dict[str, Stage] = {
    "prepare": Stage("prepare", (), _prepare_params, _prepare_identity, "stages.prepare",
                     problems=_prepare_problems),
    "teacher": Stage("teacher", ("prepare",), _teacher_params, _teacher_identity, "stages.teacher",
                     problems=_module_problems("stages.teacher")),
    "extract": Stage("extract", ("teacher",), _extract_params, module="stages.extract", distributed=True,
                     problems=_module_problems("stages.extract")),
    "distill": Stage("distill", ("extract",), _distill_params, module="stages.distill", distributed=True,
                     problems=_distill_problems),
    "analyze": Stage("analyze", ("distill",), _analyze_params, module="stages.analyze",
                     problems=_module_problems("stages.analyze")),
}


def student_stage(node: str, cfg: PipelineConfig | None = None) -> Stage:
    """The graph node of one student: upstream the cache it reads (extract, or the tier it names:
    :func:`cache_node`; without ``cfg``, extract), parameters the student's own config."""
    name = student_name(node)
    upstream = cache_node(cfg, name) if cfg is not None else "extract"
    return Stage(node, (upstream,), lambda cfg: {"student": student_params(cfg, name)}, module="stages.distill",
                 entry="run_student", distributed=True, problems=_module_problems("stages.distill"))


def stage_function(stage: str, name: str) -> Callable:
    """Function ``name`` of stage ``stage``'s module (a command the CLI offers, e.g. analyze's
    ``select_layers_cli``): the graph is how the pipeline reaches its stages."""
    return getattr(importlib.import_module(GRAPH[stage].module), name)


def tier_stage(node: str) -> Stage:
    """The graph node of one derived cache: upstream extract, parameters its ``tiers`` entry; its
    output is a cache like extract's, checked the same way (the teacher is never loaded)."""
    name = tier_name(node)
    return Stage(node, ("extract",), lambda cfg: _tier_params(cfg, name), module="stages.tier",
                 problems=_files_problems("cache.zarr/zarr.json", "cache.zarr/manifest.parquet",
                                          "cache.zarr/shards.parquet"))


def stage_of(node: str, cfg: PipelineConfig | None = None) -> Stage:
    if student_name(node) is not None:
        return student_stage(node, cfg)
    return tier_stage(node) if tier_name(node) is not None else GRAPH[node]


def upstream_closure(name: str, cfg: PipelineConfig | None = None) -> list[str]:
    """``name`` and every node it depends on, in run order (``cfg`` says which cache a student reads)."""
    order: list[str] = []

    def visit(n: str) -> None:
        for u in stage_of(n, cfg).upstream:
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
    status: str  # "up to date" | "stale" | "missing" | "running" | "failed"
    fingerprint: str
    reasons: list[str]


class Runner:
    def __init__(self, cfg: PipelineConfig, options: dict | None = None):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir)
        # read-only workdirs whose up-to-date outputs serve this one (a lab's shared cache)
        self.upstream_workdirs = [Path(w) for w in cfg.upstream_workdirs]
        self.options = options or {}
        storage.configure(cfg.data.storage_options)  # endpoint, region...: every store URL this process opens
        self._fp: dict[str, tuple[str, dict]] = {}
        self._model_plan = None
        self.versions = library_versions()

    # ------------------------------------------------------------ nodes
    def students(self) -> list[str]:
        """The students this run is about: ``--student`` choices, else every configured one."""
        chosen = self.options.get("students") or [s.name for s in self.cfg.distill.students]
        for name in chosen:
            self.cfg.student(name)  # an unknown name fails clearly
        return list(chosen)

    def nodes(self) -> list[str]:
        """Every node of this config's graph in run order: the stages, the tiers after extract, each
        student before the summary."""
        students = [student_node(s.name) for s in self.cfg.distill.students]
        tiers = [tier_node(t.name) for t in self.cfg.tiers]
        return [n for st in STAGES for n in self._with_parts(st, students, tiers)]

    @staticmethod
    def _with_parts(stage: str, students: list[str], tiers: list[str]) -> list[str]:
        if stage == "distill":
            return [*students, stage]
        return [stage, *tiers] if stage == "extract" else [stage]

    def plan(self, target: str) -> list[str]:
        """The nodes a run of ``target`` ('all', a stage, distill/<name> or tier/<name>) visits, in
        order; distill stands for the chosen students (after the tiers they read) and then the
        summary; all builds every tier."""
        if tier_name(target) is not None:
            self.cfg.tier(tier_name(target))
            return upstream_closure(target, self.cfg)
        if student_name(target) is not None:  # then the summary, once every student is complete
            self.cfg.student(student_name(target))
            return [*upstream_closure(target, self.cfg), "distill"]
        stages = list(STAGES) if target == "all" else upstream_closure(target, self.cfg)
        students = [student_node(n) for n in self.students()] if "distill" in stages else []
        read = {u for n in students for u in upstream_closure(n, self.cfg) if tier_name(u) is not None}
        tiers = [tier_node(t.name) for t in self.cfg.tiers if target == "all" or tier_node(t.name) in read]
        return [n for st in stages for n in self._with_parts(st, students, tiers)]

    # ------------------------------------------------------------ fingerprints
    def inputs(self, name: str) -> dict:
        return self.fingerprint_of(name)[1]

    def fingerprint_of(self, name: str) -> tuple[str, dict]:
        if name not in self._fp:
            st = stage_of(name, self.cfg)
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
        """Identity that only an upstream run knows: the digest of the teacher's weights for extract,
        each student's recorded file digests for the distill summary and analyze.

        A refit teacher (``run teacher --force``, or a fit that is not bit-stable) gives new weights
        under the same config; the cache made from the old weights must then be stale, and so must a
        summary or an analysis of students that were trained again (a student rebuilt after its files
        were damaged, a training that is not bit-stable on a GPU).
        """
        if name == "extract":
            rec = self.record("teacher")
            return {"teacher_weights_sha256": rec.summary.get("weights_sha256") if rec else None}
        if name in ("distill", "analyze"):
            recs = {s.name: self.record(student_node(s.name)) for s in self.cfg.distill.students}
            return {"students_sha256": {n: r.summary.get("sha256") if r else None for n, r in recs.items()}}
        return {}

    def out_dir(self, name: str, fp: str | None = None, workdir: Path | None = None) -> Path:
        """The output folder of node ``name`` in ``workdir`` (default: this one)."""
        fp = fp or self.fingerprint_of(name)[0]
        wd = workdir or self.workdir
        student = student_name(name)
        if student is not None:
            return wd / "distill" / "students" / f"{student}-{fp[:12]}"
        tier = tier_name(name)
        if tier is not None:
            return wd / "tier" / f"{tier}-{fp[:12]}"
        return wd / name / fp[:12]

    def latest_path(self, name: str) -> Path:
        """Where the lock of the last completed run of node ``name`` is copied (for 'stale because')."""
        student = student_name(name)
        if student is not None:
            return self.workdir / "distill" / "students" / f"{student}.latest.json"
        if tier_name(name) is not None:
            return self.workdir / "tier" / f"{tier_name(name)}.latest.json"
        return self.workdir / name / "latest.json"

    def check_models(self):
        """Check the config's timm models, layer indices and losses before any work (a ConfigError
        naming the key at fault); returns :attr:`model_plan`."""
        return self.model_plan

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
        node = student_node(name)
        mine = self.out_dir(node)
        for wd in [] if own else self.upstream_workdirs:
            theirs = self.out_dir(node, workdir=wd)
            if not (mine / "lock.json").exists() and (theirs / "lock.json").exists():
                return theirs
        return mine

    # ------------------------------------------------------------ state
    def record(self, name: str) -> Record | None:
        return self.checked_record(name)[0]

    def student_record(self, name: str) -> Record | None:
        """The completed output of student ``name`` (node ``distill/<name>``) for the current config."""
        return self.record(student_node(name))

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
        out = self.out_dir(name, workdir=workdir)
        lock = out / "lock.json"
        if not lock.exists():
            return None, []
        try:
            data = read_json(lock)
        except (OSError, ValueError):
            return None, [f"{lock} cannot be read"]
        if data.get("fingerprint") != self.fingerprint_of(name)[0] or not data.get("complete"):
            return None, []
        problems = stage_of(name, self.cfg).problems(self, out, data)
        if problems:
            return None, [f"output damaged: {p}" for p in problems]
        return Record(name, out, data), []

    def state(self, name: str) -> State:
        fp, inputs = self.fingerprint_of(name)
        rec, damage = self.checked_record(name)
        if rec is not None:
            elsewhere = [] if rec.path == self.out_dir(name) else [f"in {rec.path}"]
            return State(name, "up to date", fp, elsewhere)
        holder = held_by(self.out_dir(name))
        if holder is not None:
            return State(name, "running", fp, [describe_holder(holder)])
        why = failure_of(self, name)
        if why is not None:
            return State(name, "failed", fp, [why, "the next run retries it"])
        if damage:
            return State(name, "stale", fp, damage)
        notes = failed_students(self) if name == "distill" else []
        latest = self.latest_path(name)
        if latest.exists():
            try:
                old = read_json(latest)
            except (OSError, ValueError):
                old = {}
            changed = _students_named(diff(old.get("inputs", {}), inputs), [s.name for s in self.cfg.distill.students])
            changed = [c for c in changed if not c.startswith("upstream.")] + [
                f"upstream {c.split('.', 1)[1]} changed" for c in changed if c.startswith("upstream.")
            ]
            return State(name, "stale", fp, notes + (changed or ["output incomplete"]))
        return State(name, "missing", fp, notes or ["never run"])

    def status(self) -> list[State]:
        return [self.state(n) for n in self.nodes()]

    # ------------------------------------------------------------ running
    def run(self, target: str, force: bool = False, forced: set[str] | None = None) -> dict[str, Record]:
        """Build ``target`` after whatever it needs that is not up to date.  ``force`` rebuilds the
        target itself (:meth:`forced_nodes`), ``forced`` names the nodes to rebuild instead.  A
        student whose training fails is recorded and the others still train; the run then fails
        naming it."""
        plan = self.plan(target)
        forced = set(forced if forced is not None else self.forced_nodes(target) if force else ())
        done: dict[str, Record] = {}
        failed: list[str] = []
        for name in plan:
            if name == "distill" and failed:
                break
            if name in ("distill", "analyze"):  # their identity holds the students' digests, built since
                self._fp.pop(name, None)
            missing = self._incomplete_students() if name == "distill" else []
            if missing:
                if target == "distill" or student_name(target) is not None:
                    log.info(f"distill: summary waits for students {', '.join(missing)}")
                    break
                raise PipelineError(f"{target}: needs every student; not trained: "
                                    f"{', '.join(missing)} (run distill without --student)")
            rec = None if name in forced else self.record(name)
            self._agree_across_ranks(name, rec)
            if rec is not None:
                if dist.is_main():
                    log.info(f"{name}: up to date ({rec.lock['fingerprint'][:12]}), skipped")
                done[name] = rec
                continue
            try:
                done[name] = self._run_stage(name, done, name in forced)
            except PipelineError as e:
                if student_name(name) is None or not getattr(e, "retryable", False):
                    raise
                log.error(f"{name}: failed: {e}")
                failed.append(str(e))
            self._forget_downstream(name)
        if failed:
            raise PipelineError(f"distill: {len(failed)} student(s) failed and were recorded in {FAILED}; "
                                f"the next run retries them. First: {failed[0]}")
        return done

    def _agree_across_ranks(self, name: str, rec: Record | None) -> None:
        """Under torchrun, refuse a node that is up to date on some ranks' nodes only (workdirs not
        shared between nodes, holding different outputs): some ranks would build it while the others
        wait for them at another step."""
        if dist.world_size() <= 1:
            return
        have = int(dist.all_reduce_sum([1.0 if rec is not None else 0.0])[0])
        if 0 < have < dist.world_size():
            where = f"in {rec.path}" if rec is not None else f"missing from {self.out_dir(name)}"
            raise PipelineError(f"{name}: up to date on {have} of {dist.world_size()} ranks only (rank {dist.rank()}: "
                                f"{where}); give every node's workdir the same outputs (copy them, or run {name} "
                                f"there first)")

    def forced_nodes(self, target: str) -> set[str]:
        """What ``--force`` rebuilds: the target; for distill, the chosen students and the summary."""
        plan = self.plan(target)
        if target == "distill" or student_name(target) is not None:
            return {n for n in plan if student_name(n) is not None} | {"distill"}
        return {plan[-1]}

    def _incomplete_students(self) -> list[str]:
        return [s.name for s in self.cfg.distill.students if self.record(student_node(s.name)) is None]

    def _forget_downstream(self, name: str) -> None:
        """Drop cached fingerprints that may include what ``name``'s run produced (the teacher's weights)."""
        for d in downstream_of(name) if student_name(name) is None and tier_name(name) is None else []:
            self._fp.pop(d, None)
        if name in upstream_closure("extract"):
            for k in [k for k in self._fp if student_name(k) is not None or tier_name(k) is not None]:
                self._fp.pop(k)

    def _read_locks(self, upstream: dict[str, Record]) -> list[OutputLock]:
        """Shared locks on the outputs a node reads, so no --force rebuild swaps them meanwhile."""
        return [OutputLock(rec.path, shared=True, wait=self.options.get("wait", 0.0),
                           create=rec.path.is_relative_to(self.workdir))
                for rec in upstream.values() if rec is not None]

    def _run_stage(self, name: str, done: dict[str, Record], forced: bool = False) -> Record:
        """Build one node into its output folder, holding that folder's lock (and shared locks on
        what it reads).  A node that another run built while this one waited is not built again.
        Under --force the new output is built beside the old one (``<fp>.force``) and replaces it
        only once complete (:func:`fsutil.replace_dir`)."""
        fp, _ = self.fingerprint_of(name)
        final = self.out_dir(name, fp)
        upstream = {u: done[u] if u in done else self.record(u) for u in upstream_closure(name, self.cfg)[:-1]}
        if student_name(name) is not None:  # "extract" is the cache the student reads: its tier's when it names one
            upstream["extract"] = upstream[cache_node(self.cfg, student_name(name))]
        wait = self.options.get("wait", 0.0)
        if name == "distill":  # the summary: students finishing at once each try to write it; it is quick
            wait = max(wait, SUMMARY_WAIT_S)
        locks = [OutputLock(final, f"run {name}", wait=wait, workdir=self.workdir), *self._read_locks(upstream)] \
            if dist.is_main() else []
        entered = []
        try:
            for lk in locks:
                entered.append(lk.__enter__())
            built = None if forced or not dist.is_main() else self.record(name)
            if dist.all_reduce_min(0 if built is not None else 1) == 0:
                rec = built or self.record(name)
                log.info(f"{name}: built by another run meanwhile ({fp[:12]}), skipped")
                return rec
            return self._build(name, upstream, forced)
        finally:
            for lk in reversed(entered):
                lk.__exit__(None, None, None)

    def _entry(self, name: str, entry: Callable[[Context], dict | None], ctx: Context, final: Path) -> dict:
        """Run a stage's entry; a stage that fails (bad input, a non-finite teacher...) is recorded in
        ``failed.json`` in its output folder, which ``status`` shows, and the next run retries it.
        A student's failure is recorded beside its checkpoint, which the retry resumes from."""
        record = final / FAILED
        if dist.is_main():
            record.unlink(missing_ok=True)
        try:
            return entry(ctx) or {}
        except PipelineError as e:
            if dist.is_main():
                try:
                    final.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(record, {"stage": name, "fingerprint": ctx.fingerprint, "error": str(e)})
                except OSError as w:  # a full disk: the stage's own error is what the user needs
                    log.warning(f"{name}: the failure could not be recorded ({w})")
            raise

    def _build(self, name: str, upstream: dict[str, Record], forced: bool) -> Record:
        st = stage_of(name, self.cfg)
        fp, inputs = self.fingerprint_of(name)
        final = self.out_dir(name, fp)
        out = final.with_name(final.name + ".force") if forced else final
        ctx = Context(self.cfg, name, fp, inputs, out, upstream, self, self.options, forced)
        mod = importlib.import_module(st.module)
        if dist.is_main():
            log.info(f"{name}: running ({fp[:12]}) -> {final}")
        t0 = time.time()
        if st.distributed or dist.is_main():
            if dist.is_main():
                fresh_dir(out) if forced else out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            summary = self._entry(name, getattr(mod, st.entry), ctx, final)
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
                atomic_write_json(self.latest_path(name), lock)
            log.info(f"{name}: done in {wall:.1f}s")
        # rank 0's record, sent to every rank: ranks on other nodes may not share this workdir
        lock = dist.broadcast_object(lock if dist.is_main() else None)
        return Record(name, final, lock)
