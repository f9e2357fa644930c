"""Files on the local disk or on object storage (``s3://``, ``gs://``, any fsspec URL), through one
small interface: :class:`Location`.

Object stores differ from a folder: there is no rename and no partial write, a listing is one
request per thousand keys, and every read is a GET.  So a :class:`Location` on a store writes an
object whole in one PUT (a reader sees the old object, the new one or none), reads byte ranges
with one ranged GET each (:meth:`Location.read_range`), and lists a folder's objects with their
sizes in one paginated listing (:meth:`Location.files`).  On the local disk the same calls are the
durable, atomic writes of :mod:`pipeline.fsutil`.

Store options (endpoint, region, anonymous access: ``data.storage_options``) are set once per
process with :func:`configure` and apply to every URL this process opens.  Credentials never go
there: they come from the environment as the store's client expects (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role; ``GOOGLE_APPLICATION_CREDENTIALS``),
so they enter no fingerprint and no record.  The client of a protocol (s3fs for ``s3://``) is
imported only when a URL of it is opened; when it is missing, the error names the extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import PipelineError
from .fsutil import atomic_write_bytes

# data.storage_options keys that would put a secret into the config (and so into every record)
CREDENTIAL_KEYS = frozenset({"key", "secret", "token", "password", "username", "aws_access_key_id",
                             "aws_secret_access_key", "aws_session_token", "access_key", "secret_key",
                             "client_secret", "account_key", "sas_token", "connection_string", "credentials"})
# the pip extra that brings a protocol's client
EXTRAS = {"s3": "s3", "s3a": "s3"}

_options: dict[str, Any] = {}


def configure(options: dict[str, Any] | None) -> None:
    """Use ``options`` (``data.storage_options``) for every store URL this process opens from now on."""
    global _options
    _options = dict(options or {})


def options() -> dict[str, Any]:
    """The store options this process opens URLs with."""
    return dict(_options)


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object on a store (``s3://...``) rather than a local file."""
    p = str(path)
    return "://" in p and not p.startswith("file://")


def filesystem(url: str):
    """The fsspec filesystem of ``url`` (with this process's store options) and the path in it.
    A missing client is one line naming the extra that installs it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **_options)
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        how = (f"pip install 'spectralkd-pipeline[{extra}]'" if extra else
               f"install the fsspec implementation of {protocol}://")
        raise PipelineError(f"{url}: reading {protocol}:// needs a client that is not installed ({e}); {how}") from None
    except ValueError as e:
        raise PipelineError(f"{url}: cannot open ({e})") from None


def open_file(url: str, block_size: int = 8 << 20):
    """``url`` opened for reading: a local file, or a store object read ahead in blocks of
    ``block_size`` (for sequential reads: a tar scan)."""
    if not is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    fs, path = filesystem(url)
    return fs.open(path, "rb", block_size=block_size)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of ``url``: one ranged GET on a store."""
    return Location(url).read_range(start, end)


def object_identities(urls: list[str]) -> dict[str, list]:
    """Per store URL, what identifies the object's bytes without reading them: [url, size, etag].
    One listing per folder (not one request per object); an object missing there is refused."""
    out: dict[str, list] = {}
    by_folder: dict[str, list[str]] = {}
    for u in urls:
        by_folder.setdefault(u.rsplit("/", 1)[0], []).append(u)
    for folder, members in by_folder.items():
        listed = Location(folder).listing()
        for u in members:
            info = listed.get(u.rsplit("/", 1)[1])
            if info is None:
                raise FileNotFoundError(u)
            out[u] = [u, int(info["size"]), str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or
                                                 info.get("crc32c") or "")]
    return out


class Location:
    """A file or folder on the local disk or on a store.  ``/`` joins a relative key; ``str()`` is
    its path or URL (for messages and for zarr).  Writes are whole: an atomic rename locally, one
    PUT on a store."""

    def __init__(self, where: str | os.PathLike | "Location"):
        self.url = str(where.url if isinstance(where, Location) else where).rstrip("/") or "/"
        self.remote = is_url(self.url)
        self._fs = None

    def __getstate__(self) -> dict:  # a store client does not cross process boundaries
        return {"url": self.url, "remote": self.remote, "_fs": None}

    # ------------------------------------------------------------ naming
    def __truediv__(self, rel: str) -> "Location":
        child = Location(f"{self.url}/{str(rel).strip('/')}" if self.remote else str(Path(self.url) / str(rel)))
        child._fs = self._fs
        return child

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __fspath__(self) -> str:
        if self.remote:
            raise TypeError(f"{self.url} is on a store, not a local path")
        return self.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def local(self) -> Path:
        """The local path (a store location has none)."""
        if self.remote:
            raise TypeError(f"{self.url} is on a store, not a local path")
        return Path(self.url)

    def _store(self):
        if self._fs is None:
            self._fs = filesystem(self.url)[0]
        return self._fs, filesystem_path(self._fs, self.url)

    # ------------------------------------------------------------ reads
    def read_bytes(self) -> bytes:
        """The whole file (one GET on a store); FileNotFoundError when there is none."""
        if not self.remote:
            return Path(self.url).read_bytes()
        fs, path = self._store()
        return fs.cat_file(path)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (one ranged GET on a store); fewer when the file is shorter."""
        if end <= start:
            return b""
        if not self.remote:
            with open(self.url, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        fs, path = self._store()
        try:
            return fs.cat_file(path, start=start, end=end)
        except OSError as e:
            if getattr(e, "errno", None) == 22 or "range" in str(e).lower():  # starts past the end: none of it
                return b""
            raise

    def size(self) -> int | None:
        """The file's size in bytes, or None when there is no such file (one HEAD on a store)."""
        if not self.remote:
            try:
                return Path(self.url).stat().st_size
            except FileNotFoundError:
                return None
        fs, path = self._store()
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def exists(self) -> bool:
        return self.size() is not None

    def listing(self) -> dict[str, dict]:
        """Name -> details (size, ETag on a store) of every file directly in this folder."""
        if not self.remote:
            p = Path(self.url)
            return {c.name: {"size": c.stat().st_size} for c in p.iterdir() if c.is_file()} if p.is_dir() else {}
        fs, path = self._store()
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") == "file"}

    def files(self) -> dict[str, int]:
        """Relative key -> size of every file below this folder (one paginated listing on a store)."""
        if not self.remote:
            root = Path(self.url)
            if not root.is_dir():
                return {}
            return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        fs, path = self._store()
        try:
            found = fs.find(path, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        n = len(path.rstrip("/")) + 1
        return {k[n:]: int(v["size"]) for k, v in found.items() if v.get("type", "file") == "file"}

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """The bytes of the files ``keys`` (relative) below this folder, read concurrently on a store."""
        if not self.remote:
            return {k: (self / k).read_bytes() for k in keys}
        if not keys:
            return {}
        fs, path = self._store()
        got = fs.cat([f"{path}/{k}" for k in keys], on_error="raise")
        return {k: got[f"{path}/{k}"] for k in keys}

    # ------------------------------------------------------------ writes
    def write_bytes(self, parts: list, sync_dir: bool = True) -> int:
        """Write the byte strings ``parts`` as this file, whole (atomically and durably locally, one
        PUT on a store); returns its size."""
        if not self.remote:
            atomic_write_bytes(self.url, parts, sync_dir=sync_dir)
        else:
            fs, path = self._store()
            fs.pipe_file(path, b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts))
        return sum(len(memoryview(p).cast("B")) for p in parts)

    def write_json(self, obj: Any) -> None:
        self.write_bytes([(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()])

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def remove(self) -> None:
        """Remove this file (nothing when there is none)."""
        if not self.remote:
            Path(self.url).unlink(missing_ok=True)
            return
        fs, path = self._store()
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        """Remove this folder and everything below it (nothing when there is none)."""
        if not self.remote:
            shutil.rmtree(self.url, ignore_errors=True)
            return
        fs, path = self._store()
        keys = list(fs.find(path))
        if keys:
            fs.rm(keys)

    def make_dirs(self) -> None:
        """Create this folder locally (a store has no folders: keys are enough)."""
        if not self.remote:
            Path(self.url).mkdir(parents=True, exist_ok=True)


def filesystem_path(fs, url: str) -> str:
    """``url`` as a path of its filesystem (the protocol dropped)."""
    return fs._strip_protocol(url)


# ----------------------------------------------------------------------------- counting requests

class StoreCalls:
    """The requests this process's S3 clients sent while it was active, by operation, and the
    bytes the GETs returned: ``with StoreCalls() as calls: ...; calls.count("GetObject")``."""

    _lock = threading.Lock()
    _active: list["StoreCalls"] = []
    _patched = None

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.ranges: list[str] = []
        self.get_bytes = 0

    def count(self, operation: str) -> int:
        return self.calls.get(operation, 0)

    def __enter__(self) -> "StoreCalls":
        import s3fs

        with StoreCalls._lock:
            if StoreCalls._patched is None:
                StoreCalls._patched = s3fs.S3FileSystem._call_s3
                original = StoreCalls._patched

                async def counted(fs, method, *args, **kwargs):
                    out = await original(fs, method, *args, **kwargs)
                    op = "".join(w.capitalize() for w in str(method).split("_"))
                    for c in list(StoreCalls._active):
                        c._record(op, kwargs, out)
                    return out

                s3fs.S3FileSystem._call_s3 = counted
            StoreCalls._active.append(self)
        return self

    def _record(self, op: str, kwargs: dict, out) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if op == "GetObject":
            self.ranges.append(kwargs.get("Range", ""))
            self.get_bytes += int((out or {}).get("ContentLength", 0) or 0)

    def __exit__(self, *exc) -> None:
        import s3fs

        with StoreCalls._lock:
            StoreCalls._active.remove(self)
            if not StoreCalls._active and StoreCalls._patched is not None:
                s3fs.S3FileSystem._call_s3 = StoreCalls._patched
                StoreCalls._patched = None


@contextmanager
def store_calls() -> Iterator[StoreCalls]:
    with StoreCalls() as c:
        yield c
