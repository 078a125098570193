"""The mount process's Prometheus metrics (one mount per process, so module level).

Counts of reads, bytes and latency are taken at the FUSE boundary; errors by errno at
the error boundary; UFS fallbacks, failovers and the page buffer's hits are read from
the client's own counters when scraped, so nothing is counted twice.
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry()


class ReadCounts:
    """Reads, their bytes and their latency, counted on the session's loop.

    A read is the request a mount answers most, and prometheus_client's counters and
    histograms take a lock and a few microseconds each: three of them per read were a
    tenth of what a cached 4 KiB read costs the mount. Reads are only counted from the
    one trio thread, so plain integers do, and `ReadCollector` turns them into the same
    metrics at scrape time.
    """

    BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

    def __init__(self):
        self.reads = 0
        self.held_reads = 0  # of `reads`, answered from a held object file (dorafs/fuse/objectfiles.py)
        self.bytes = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(self.BUCKETS) + 1)  # the last one: above the largest bound

    def add(self, size: int, seconds: float) -> None:
        self.reads += 1
        self.bytes += size
        self.seconds += seconds
        self.buckets[bisect.bisect_left(self.BUCKETS, seconds)] += 1

    def add_held(self, size: int, seconds: float) -> None:
        self.held_reads += 1
        self.add(size, seconds)


READS = ReadCounts()


class ReadCollector:
    def __init__(self, counts: ReadCounts):
        self.counts = counts

    def collect(self):
        c = self.counts
        yield CounterMetricFamily("dorafs_mount_reads", "read() requests from the kernel", value=c.reads)
        yield CounterMetricFamily("dorafs_mount_object_file_reads", "read() requests answered from an object "
                                  "file the mount holds (a version wholly cached on this machine)",
                                  value=c.held_reads)
        yield CounterMetricFamily("dorafs_mount_read_bytes", "Bytes returned to the kernel by read()",
                                  value=c.bytes)
        cumulative, running = [], 0
        for bound, count in zip((*map(floatToGoString, c.BUCKETS), "+Inf"), c.buckets):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily("dorafs_mount_read_latency_seconds", "Time to answer one read() request",
                                    buckets=cumulative, sum_value=c.seconds)


REGISTRY.register(ReadCollector(READS))
WRITE_BYTES = Counter("dorafs_mount_write_bytes", "Bytes accepted by write()", registry=REGISTRY)
UPLOADS = Counter("dorafs_mount_uploads", "Files uploaded to the UFS at close/fsync, by result", ["result"],
                  registry=REGISTRY)
UPLOAD_BYTES = Counter("dorafs_mount_upload_bytes", "Bytes of files uploaded to the UFS", registry=REGISTRY)
STAGING_BYTES = Gauge("dorafs_mount_staging_bytes", "Staging space held by files being written", registry=REGISTRY)
for _result in ("ok", "failed"):
    UPLOADS.labels(_result)
INODES = Gauge("dorafs_mount_inodes", "Inodes the kernel or an open handle holds (the root included)",
               registry=REGISTRY)
PASSTHROUGH_OPENS = Counter("dorafs_mount_passthrough_opens", "Read-only opens of files: handed to the kernel "
                            "(result=granted) or served by the mount, by why", ["result"], registry=REGISTRY)
OBJECT_FILE_OPENS = Counter("dorafs_mount_object_file_opens", "Read-only opens of files of passthrough_min_size "
                            "or more: holding the verified object file of their version (result=held) or why "
                            "not", ["result"], registry=REGISTRY)
OBJECT_FILES_TAKEN_AGAIN = Counter("dorafs_mount_object_files_taken_again", "Opens that took an object file held "
                                   "on after the last open of its version ended, without asking the worker for it",
                                   registry=REGISTRY)
OBJECT_FILE_PAGES_CHECKED = Counter("dorafs_mount_object_file_pages_checked", "Pages of object files checked "
                                    "against their checksums in a pass before the file is held (pages the "
                                    "mount read from that file and checked as it read them are not)",
                                    registry=REGISTRY)
OBJECT_FILES_PREPARING = Gauge("dorafs_mount_object_files_preparing", "Versions read to their end being sealed "
                               "by their worker and verified, to be held from their next open", registry=REGISTRY)
PASSTHROUGH_READAHEAD = Counter("dorafs_mount_passthrough_readahead", "READ requests for a handle the kernel "
                                "reads by passthrough: its readahead into the FUSE file's own page cache "
                                "(posix_fadvise WILLNEED, readahead(2)), answered from the held object file, for "
                                "the file's next opens to read", registry=REGISTRY)
PASSTHROUGH_FILES = Gauge("dorafs_mount_passthrough_files", "Backing files registered with the kernel "
                          "(one per inode read through passthrough)", registry=REGISTRY)
ERRORS = Counter("dorafs_mount_errors", "Errors returned to applications, by errno", ["errno"], registry=REGISTRY)
for _name in ("EIO", "ESTALE", "ENOENT"):  # the usual ones start at zero, visible on dashboards
    ERRORS.labels(_name)


class ClientCollector:
    """Exposes a DoraClient's counters at scrape time."""

    def __init__(self, client):
        self.client = client

    def collect(self):
        stats, buffer = self.client.stats, self.client.buffer.statistics()
        fallbacks = CounterMetricFamily("dorafs_mount_ufs_fallbacks", "Reads served from the UFS directly "
                                        "because no worker answered", labels=["kind"])
        fallbacks.add_metric(["page"], stats.ufs_fallback_pages)
        fallbacks.add_metric(["metadata"], stats.ufs_fallback_metadata)
        yield fallbacks
        yield CounterMetricFamily("dorafs_mount_failovers", "Worker requests moved to the next candidate",
                                  value=stats.failovers)
        yield CounterMetricFamily("dorafs_mount_worker_pages", "Pages fetched from workers",
                                  value=stats.worker_pages)
        yield CounterMetricFamily("dorafs_mount_short_circuit_pages",
                                  "Pages read from a local worker's page file instead of over HTTP",
                                  value=stats.short_circuit_pages)
        yield CounterMetricFamily("dorafs_mount_mapped_pages",
                                  "Pages of a local worker's files mapped from the kernel's page cache, not copied",
                                  value=stats.mapped_pages)
        yield CounterMetricFamily("dorafs_mount_worker_page_parts",
                                  "Parts of pages fetched from workers for random readers, instead of whole pages",
                                  value=stats.worker_parts)
        yield CounterMetricFamily("dorafs_mount_statuses_kept",
                                  "Statuses answered from those the mount keeps, without asking a worker",
                                  value=self.client.statuses.hits)
        yield CounterMetricFamily("dorafs_mount_listing_prefetches",
                                  "Directory listings fetched ahead after repeated status misses in them",
                                  value=self.client.scans.started)
        prefetches = self.client.reader.prefetches
        yield CounterMetricFamily("dorafs_mount_readahead_runs", "Readahead runs started for sequential readers",
                                  value=prefetches.runs)
        yield CounterMetricFamily("dorafs_mount_readahead_cancelled_runs",
                                  "Readahead runs cancelled because their file closed or its reader seeked away",
                                  value=prefetches.cancelled_runs)
        hits = CounterMetricFamily("dorafs_mount_buffer_lookups", "Page buffer lookups", labels=["result"])
        hits.add_metric(["hit"], buffer["hits"])
        hits.add_metric(["miss"], buffer["misses"])
        yield hits
        yield GaugeMetricFamily("dorafs_mount_buffer_bytes", "Memory held by the page buffer", value=buffer["bytes"])
        yield GaugeMetricFamily("dorafs_mount_buffer_mapped_bytes",
                                "Bytes of local page files the page buffer holds mapped", value=buffer["mapped_bytes"])
        yield GaugeMetricFamily("dorafs_mount_workers", "Workers on the ring", value=len(self.client.ring))
