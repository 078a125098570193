"""The worker's Prometheus metrics, on a registry of its own (one per daemon)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.page_requests = Counter(
            "dorafs_worker_page_requests", "Page reads by outcome (hit, miss, shared miss)", ["result"], registry=r)
        self.bytes_served = Counter("dorafs_worker_bytes_served", "Page bytes sent to clients", registry=r)
        self.ufs_requests = Counter(
            "dorafs_worker_ufs_requests", "Requests made to the UFS by operation", ["op"], registry=r)
        self.ufs_errors = Counter("dorafs_worker_ufs_errors", "Failed UFS requests by operation", ["op"], registry=r)
        self.ufs_bytes = Counter("dorafs_worker_ufs_bytes", "Bytes read from the UFS", registry=r)
        self.ufs_latency = Histogram(
            "dorafs_worker_ufs_latency_seconds", "UFS request latency by operation", ["op"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.metadata_requests = Counter(
            "dorafs_worker_metadata_requests", "Status and listing requests by the level that answered (memory, disk) or miss (UFS)", ["op", "result"], registry=r)
        self.corrupt_pages = Counter(
            "dorafs_worker_corrupt_pages", "Cached pages whose checksum failed (dropped and refetched)", registry=r)
        self.cache_used = Gauge("dorafs_worker_cache_used_bytes", "Bytes of cached pages", registry=r)
        self.cache_capacity = Gauge("dorafs_worker_cache_capacity_bytes", "Page cache capacity", registry=r)
        self.pages = Gauge("dorafs_worker_pages", "Cached pages", registry=r)
        self.whole_objects = Gauge("dorafs_worker_whole_objects", "Object versions cached as one file "
                                   "(sealed for a mount's passthrough)", registry=r)
        self.held_bytes = Gauge("dorafs_worker_held_bytes", "Bytes of evicted object files a mount still reads "
                                "through passthrough (part of the used bytes)", registry=r)
        self.evictions = Gauge("dorafs_worker_evictions", "Pages evicted since start", registry=r)
        self.listing_prefetches = Counter(
            "dorafs_worker_listing_prefetches", "Directory listings fetched ahead after repeated stat misses",
            registry=r)
        self.metadata_entries = Gauge(
            "dorafs_worker_metadata_memory_entries", "Statuses and listing entries held in memory", registry=r)
        self.metadata_disk_errors = Gauge(
            "dorafs_worker_metadata_disk_errors", "Metadata store operations that failed on disk", registry=r)
        self.cache_write_errors = Gauge(
            "dorafs_worker_cache_write_errors", "Pages that could not be written to the cache disk", registry=r)
        self.load_files = Counter(
            "dorafs_worker_load_files", "Files handled for load and free jobs by outcome", ["result"], registry=r)
        self.load_pages = Counter(
            "dorafs_worker_load_pages", "Pages handled for load jobs by outcome", ["result"], registry=r)
        self.load_bytes = Counter("dorafs_worker_load_bytes", "Bytes fetched from the UFS for load jobs", registry=r)
        self.cache_degraded = Gauge(
            "dorafs_worker_cache_degraded", "1 while a full or failing cache disk limits caching (see /healthz)",
            registry=r)
        self.cache_limit = Gauge(
            "dorafs_worker_cache_limit_bytes", "Bytes the page cache may use now: the capacity, or less on a full disk",
            registry=r)
        # Every label value starts at zero, so dashboards see 0 rather than no series.
        for op in ("read", "stat", "list"):
            self.ufs_requests.labels(op)
            self.ufs_errors.labels(op)
        for result in ("hit", "miss", "shared"):
            self.page_requests.labels(result)
        for op in ("stat", "list"):
            for result in ("memory", "disk", "miss"):
                self.metadata_requests.labels(op, result)
        for result in ("loaded", "cached", "metadata", "freed", "failed", "cancelled"):
            self.load_files.labels(result)
        for result in ("fetched", "cached", "repaired"):
            self.load_pages.labels(result)
