"""The mount's client core: routing and failover (router.py), metadata (metadata.py), the
read path (reading.py), readahead per open file (prefetch.py), wired by client.py;
writes and namespace changes (writes.py, namespace.py)."""

from dorafs.client.client import DoraClient, OpenFile

__all__ = ["DoraClient", "OpenFile"]
