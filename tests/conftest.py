import itertools
import os

import pytest

from tests.support import S3Server

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto server) on loopback; its credentials are put in os.environ."""
    server = S3Server(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket name for one test."""
    name = f"test-bucket-{os.getpid()}-{next(_bucket_numbers)}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def procs(tmp_path):
    """Start real dorafs processes; all are stopped (mounts unmounted) at teardown.

    Usage: `worker = procs.worker()`, `mount = procs.mount(uri, workers=[...])`. Logs are
    checked for tracebacks and unexpected ERROR lines after the test passes.
    """
    from tests.cluster import Mount, Registry, Worker

    class Procs:
        def __init__(self):
            self.started = []
            self.allow: tuple[str, ...] = ()
            self.counter = itertools.count()

        def _add(self, proc):
            self.started.append(proc)
            return proc

        def worker(self, **kw):
            return self._add(Worker(tmp_path, kw.pop("name", f"worker{next(self.counter)}"), **kw))

        def registry(self, **kw):
            return self._add(Registry(tmp_path, kw.pop("name", f"registry{next(self.counter)}"), **kw))

        def mount(self, uri, **kw):
            return self._add(Mount(tmp_path, uri, name=kw.pop("name", f"mount{next(self.counter)}"), **kw))

    p = Procs()
    try:
        yield p
    finally:
        # Mounts first (they may use the workers), then the daemons: always, even on failure.
        for proc in sorted(p.started, key=lambda x: not isinstance(x, Mount)):
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown of {proc.name} failed: {exc!r}")
    for proc in p.started:
        proc.check_log(p.allow)
