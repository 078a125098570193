"""dorafs-registry: the service registry where workers join, heartbeat and expire, and the load-job scheduler."""
