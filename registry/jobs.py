"""What a job is, as the scheduler keeps it and saves it: spec, batches, progress.

A `Job` is saved whole as JSON (`Job.to_dict`) after its changes, and read back on a
restart (`Job.from_dict`); everything in it is bounded (see registry/scheduler.py), so
the file stays small whatever the size of the tree being loaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from dorafs.errors import InvalidRequest
from dorafs.ufs import FileStatus, normalize

MAX_FAILED_KEPT = 100  # final failures kept with their causes
STATES = ("running", "completed", "failed", "cancelled")
COUNTERS = ("files_listed", "dirs_listed", "bytes_listed", "files_done", "files_cached", "files_failed",
            "bytes_done", "bytes_loaded", "pages_fetched", "pages_cached", "pages_repaired", "pages_freed",
            "batches", "batch_failures")


@dataclass
class JobSpec:
    uri: str
    kind: str = "load"  # or "free"
    recursive: bool = False
    bandwidth: int = 0  # bytes per second for the whole job; 0: unlimited
    verify: bool = False
    metadata_only: bool = False
    skip_cached: bool = False

    @classmethod
    def from_body(cls, body: dict) -> JobSpec:
        uri = body.get("uri")
        if not isinstance(uri, str):
            raise InvalidRequest(f"'uri' must be a UFS URI string, got {uri!r}")
        try:
            uri = normalize(uri)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        kind = body.get("kind", "load")
        if kind not in ("load", "free"):
            raise InvalidRequest(f"'kind' must be 'load' or 'free', got {kind!r}")
        bandwidth = body.get("bandwidth", 0) or 0
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
            raise InvalidRequest(f"'bandwidth' must be bytes per second (a non-negative integer), got {bandwidth!r}")
        flags = {}
        for name in ("recursive", "verify", "metadata_only", "skip_cached"):
            value = body.get(name, False)
            if not isinstance(value, bool):
                raise InvalidRequest(f"{name!r} must be true or false, got {value!r}")
            flags[name] = value
        return cls(uri=uri, kind=kind, bandwidth=bandwidth, **flags)


@dataclass
class Batch:
    id: int
    owner: str  # worker id the files were grouped for
    files: list[dict]  # {"uri", "status"}
    nbytes: int = 0
    filling: bool = True  # still being filled by the walk
    retry: bool = False  # the end-of-job retry of failed files
    attempts: int = 0
    ring_version: int = -1  # membership version the files were grouped under

    def add(self, uri: str, status: FileStatus) -> None:
        self.files.append({"uri": uri, "status": status.to_dict()})
        self.nbytes += status.size


@dataclass
class Job:
    id: str
    spec: JobSpec
    state: str = "running"
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    counters: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    stack: list = field(default_factory=list)  # [{"dir", "after"}], the walk's position
    root_is_dir: bool = True
    listing_done: bool = False
    passes: int = 1
    members: list = field(default_factory=list)  # ring worker ids when the pass started
    batches: dict = field(default_factory=dict)  # id -> Batch
    next_batch: int = 0
    retry: list = field(default_factory=list)  # [{"uri", "status", "error"}] for the retry at the end
    retrying: bool = False
    failed: list = field(default_factory=list)  # the last MAX_FAILED_KEPT final failures

    def to_dict(self) -> dict:
        data = asdict(self)
        data["batches"] = [asdict(b) for b in self.batches.values()]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        data = dict(data)
        spec = JobSpec(**data.pop("spec"))
        batches = {b["id"]: Batch(**_renamed(b)) for b in data.pop("batches")}
        counters = dict.fromkeys(COUNTERS, 0) | data.pop("counters")
        return cls(spec=spec, batches=batches, counters=counters, **data)

    def summary(self) -> dict:
        """What `GET /v1/jobs` lists and `GET /v1/job` starts with."""
        end = self.finished or time.time()
        return {"id": self.id, **asdict(self.spec), "state": self.state, "error": self.error,
                "created": self.created, "finished": self.finished, "elapsed": round(end - self.created, 3),
                "listing_done": self.listing_done, "pass": self.passes, "retrying": len(self.retry),
                "batches_pending": len(self.batches), **self.counters}

    def detail(self) -> dict:
        return self.summary() | {"failed_files": list(self.failed)}

    def fail_file(self, uri: str, error: str, errno: str = "EIO") -> None:
        self.counters["files_failed"] += 1
        self.failed.append({"uri": uri, "error": error, "errno": errno})
        del self.failed[:-MAX_FAILED_KEPT]


def _renamed(batch: dict) -> dict:
    """A batch as saved by this version, from a state file of any version (a batch's
    `filling` was called `open` before)."""
    batch = dict(batch)
    if "open" in batch:
        batch["filling"] = batch.pop("open")
    return batch
