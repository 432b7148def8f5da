"""What the benchmarks share: reading the server's metrics and summarising samples."""

from __future__ import annotations

import re

from tests.server_harness import RunningServer


def metric(server: RunningServer, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", server.get("/metrics").text, re.M)
    return float(match.group(1)) if match else float("nan")


def redis_scripts(server: RunningServer) -> dict[str, float]:
    """The node's ``mts_redis_scripts_total`` by script (a node on a shared line), with the
    reads that carried the whole line as ``whole_line_reads``."""
    text = server.get("/metrics").text
    counts = {s: float(n) for s, n in re.findall(r'^mts_redis_scripts_total\{script="([^"]+)"\} (\S+)$', text, re.M)}
    whole = re.search(r"^mts_line_whole_reads_total (\S+)$", text, re.M)
    if whole:
        counts["whole_line_reads"] = float(whole.group(1))
    return counts


def lag_buckets(server: RunningServer) -> dict[float, float]:
    """Cumulative counts of the server's event-loop lag histogram, by upper bound in seconds."""
    pattern = r'^mts_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    return {float(le): float(n) for le, n in re.findall(pattern, server.get("/metrics").text, re.M)}


def lag_p99_between(before: dict[float, float], after: dict[float, float]) -> float:
    """The bucket bound under which 99 % of the lag samples taken between two readings fall."""
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0)
    for bound in bounds:
        if after[bound] - before.get(bound, 0.0) >= 0.99 * total:
            return bound
    return float("inf")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
