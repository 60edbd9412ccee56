"""The stats object: counters, the ack-latency histogram, and what the cluster records."""

from __future__ import annotations

import pytest

from clustersess.stats import ACK_LATENCY_BOUNDS, Histogram, Stats
from tests.memcluster import Cluster, cluster, write

__all__ = ["cluster"]  # the fixture


def test_histogram_counts_per_bucket_with_prometheus_le_semantics() -> None:
    seen: list[float] = []
    h = Histogram((0.001, 0.01, 0.1), also=seen.append)
    for value in (0.0005, 0.001, 0.002, 0.01, 0.5, 3.0):
        h.observe(value)
    assert h.counts == [2, 2, 0, 2]  # <= 0.001, <= 0.01, <= 0.1, above
    assert h.count == 6 and h.total == pytest.approx(3.5135)
    assert seen == [0.0005, 0.001, 0.002, 0.01, 0.5, 3.0]


def test_as_dict_is_the_counters_and_histograms_are_apart() -> None:
    stats = Stats()
    counters = stats.as_dict()
    assert all(type(v) is int for v in counters.values())
    assert "ack_latency" not in counters and {"bytes_sent", "takeovers", "messages_dropped_auth"} <= set(counters)
    assert stats.histograms() == {"ack_latency": stats.ack_latency}
    assert stats.ack_latency.bounds == ACK_LATENCY_BOUNDS


async def test_a_replicated_write_records_bytes_and_its_ack_latency(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2")
    before = n1.stats.ack_latency.count
    await write(n1, None, x=1)
    assert n1.stats.ack_latency.count == before + 1
    assert 0 < n1.stats.ack_latency.total < 1.0
    assert n1.stats.bytes_sent > 0 and n2.stats.bytes_received > 0
