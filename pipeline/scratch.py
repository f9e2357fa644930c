"""Students on workers that share nothing with this machine but the object store
(``distill.shared_workdir: false``).

Each student trains in a scratch folder of its own (on its Dask worker, or a temporary folder for
``--jobs``): the folder receives this run's pipeline file, the records of prepare, teacher and
extract as a read-only upstream workdir (``upstream/``: their lock files and the small files their
checks read, never input tars or a cache) and the student's unfinished output (its checkpoint, so
a rerun resumes), and the student runs there as ``run distill/<name> --workdir work
--upstream-workdir upstream``.  Its images and targets come from the store (``data.train_shards``
URLs, ``extract.location``).  Its finished folder comes back as bytes and is installed here, under
the student's lock, after checking that it was trained under this config's fingerprint: ``status``,
``verify`` and the summary see it as if it had trained here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_CONFIG
from .errors import PipelineError
from .fsutil import fresh_dir, read_json, replace_dir
from .locking import OutputLock
from .nodes import FAILED, STUDENT

if TYPE_CHECKING:
    from .graph import Runner

UPSTREAM = "upstream"
WORK = "work"
CONFIG = "pipeline.yaml"
STUDENTS = f"{WORK}/distill/students"


class ScratchStudents:
    """What every scratch student receives, and the installation of what each one sends back."""

    def __init__(self, runner: "Runner", args):
        from cache.reader import cache_path
        from pipeline.storage import is_url

        self.runner, self.args = runner, args
        recs = {st: runner.record(st) for st in ("prepare", "teacher", "extract")}
        missing = [st for st, r in recs.items() if r is None]
        if missing:
            raise PipelineError(f"distill.shared_workdir: false: {', '.join(missing)} must be up to date here first")
        if not is_url(str(cache_path(recs["extract"]))):
            raise PipelineError("distill.shared_workdir: false: the students' workers read the cache from a store; "
                                "set extract.location (s3://bucket/prefix) and rerun extract")
        if read_json(Path(recs["prepare"].path) / "shards.json").get("sizes"):
            raise PipelineError("distill.shared_workdir: false: the input shards were written into this workdir "
                                f"(data.source {runner.cfg.data.source}); put them on the store and use "
                                "data.source: shards with their URLs")
        config = Path(args.config or DEFAULT_CONFIG)
        try:
            self.files = {CONFIG: config.read_bytes(), **upstream_files(recs)}
        except OSError as e:
            raise PipelineError(f"{config}: cannot be read to send it to the students ({e.strerror})") from None
        self.locks: dict[str, OutputLock] = {}

    def argv(self, name: str, force: bool) -> list[str]:
        """The student's command (after the Python executable), relative to its scratch folder."""
        argv = ["-m", "pipeline", "run", STUDENT + name, "-c", CONFIG, "--workdir", WORK,
                "--upstream-workdir", UPSTREAM]
        for o in self.args.overrides:
            argv += ["--set", o]
        return argv + (["--force"] if force else [])

    def claim(self, name: str, force: bool) -> dict[str, bytes]:
        """Take the student's lock here (no other run trains it meanwhile); the files of its own its
        scratch folder starts with besides the common ``files``: its unfinished output (none with
        ``force``)."""
        final = self.runner.out_dir(STUDENT + name)
        lock = OutputLock(final, f"run {STUDENT}{name} in a scratch workdir", wait=self.args.wait or 0.0,
                          workdir=self.runner.workdir)
        self.locks[name] = lock.__enter__()
        own = {}
        if final.is_dir() and not force:
            own = {f"{STUDENTS}/{final.name}/{p.relative_to(final)}": p.read_bytes()
                   for p in final.rglob("*") if p.is_file() and p.name != FAILED}
        return own

    def install(self, name: str, outputs: dict[str, bytes]) -> None:
        """Put the student's folder that came back in place here (whole, replacing the unfinished
        one), then release its lock.  A folder of another fingerprint is refused, naming both."""
        try:
            final = self.runner.out_dir(STUDENT + name)
            prefix = f"distill/students/{final.name}/"
            mine = {k[len(prefix):]: v for k, v in outputs.items() if k.startswith(prefix)}
            if not mine:
                others = sorted({k.split("/")[2] for k in outputs if k.startswith("distill/students/")})
                if others:
                    raise PipelineError(f"{STUDENT}{name}: its worker trained {others[0]}, not {final.name}: the "
                                        f"worker computed another fingerprint (its config or upstream records differ)")
                return
            new = fresh_dir(final.with_name(final.name + ".incoming"))
            for rel, data in mine.items():
                (new / rel).parent.mkdir(parents=True, exist_ok=True)
                (new / rel).write_bytes(data)
            replace_dir(new, final)
        finally:
            lock = self.locks.pop(name, None)
            if lock is not None:
                lock.__exit__(None, None, None)

    def release(self) -> None:
        for name in list(self.locks):
            self.locks.pop(name).__exit__(None, None, None)


def upstream_files(recs: dict) -> dict[str, bytes]:
    """The records a student's runner checks, as ``upstream/<stage>/<folder>/<file>``: every file of
    each output folder but input tars and a local cache."""
    from cache.reader import CACHE_DIR

    out = {}
    for st, rec in recs.items():
        root = Path(rec.path)
        for p in root.rglob("*"):
            rel = p.relative_to(root)
            if p.is_file() and p.suffix != ".tar" and CACHE_DIR not in rel.parts:
                out[f"{UPSTREAM}/{st}/{root.name}/{rel}"] = p.read_bytes()
    return out


def write_files(folder: str | Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = Path(folder) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def student_outputs(folder: str | Path) -> dict[str, bytes]:
    """Every file of the students' folders of a scratch workdir, relative to the workdir."""
    work = Path(folder) / WORK
    root = work / "distill" / "students"
    return {str(p.relative_to(work)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def scratch_folder() -> str:
    return tempfile.mkdtemp(prefix="spectralkd-student-")
