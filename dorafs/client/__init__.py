"""The client: membership view, hash ring, read planner, page buffer, UFS fallback."""

from dorafs.client.client import DoraClient, OpenFile

__all__ = ["DoraClient", "OpenFile"]
