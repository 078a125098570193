"""The FUSE adapter: translates kernel requests into DoraClient calls, nothing more."""
