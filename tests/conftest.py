import itertools
import os

import pytest

from tests.faultproxy import FaultProxy
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
def proxy(s3_server):
    """A TCP proxy in front of the S3 server that injects faults (tests/faultproxy.py);
    point a process at it with `proxy.env(s3_server.env)`."""
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()



@pytest.fixture
def procs(tmp_path):
    """Real dorafs processes for one test, all stopped (mounts unmounted) at teardown.

    `procs.worker()`, `procs.registry()`, `procs.mount(uri, workers=[...])`; logs are
    checked for tracebacks and for WARNING and ERROR lines the test did not name: a test
    that expects one sets `procs.allow` to regexes that match exactly those lines.
    """
    from tests.cluster import ProcessSet

    with ProcessSet(tmp_path) as p:
        yield p
