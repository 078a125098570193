"""dorafs: a POSIX mount backed by a distributed page cache."""

__version__ = "0.1.0"
