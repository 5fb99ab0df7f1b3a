"""Summing the workers' Prometheus expositions (`spear_rt.cluster.metrics_share`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from spear_rt.cluster.metrics_share import STALE_S, MetricsShare, merge

ONE = """# HELP spear_requests_total Requests
# TYPE spear_requests_total counter
spear_requests_total{operation="chat",instance="a"} 3
# HELP spear_latency_seconds Latency
# TYPE spear_latency_seconds histogram
spear_latency_seconds_bucket{le="0.1"} 2
spear_latency_seconds_sum 0.25
spear_latency_seconds_count 2
"""
TWO = """# HELP spear_requests_total Requests
# TYPE spear_requests_total counter
spear_requests_total{operation="chat",instance="a"} 4
spear_requests_total{operation="chat",instance="b"} 1
# HELP spear_latency_seconds Latency
# TYPE spear_latency_seconds histogram
spear_latency_seconds_bucket{le="0.1"} 1
spear_latency_seconds_sum 0.5
spear_latency_seconds_count 1
"""


def test_samples_are_summed_by_name_and_labels_and_meta_kept_once() -> None:
    lines = merge([ONE, TWO]).splitlines()
    assert lines.count("# TYPE spear_requests_total counter") == 1
    assert 'spear_requests_total{operation="chat",instance="a"} 7' in lines
    assert 'spear_requests_total{operation="chat",instance="b"} 1' in lines
    assert 'spear_latency_seconds_bucket{le="0.1"} 3' in lines
    assert "spear_latency_seconds_sum 0.75" in lines and "spear_latency_seconds_count 3" in lines
    assert lines.index("# TYPE spear_requests_total counter") < lines.index(
        'spear_requests_total{operation="chat",instance="a"} 7'
    )


def test_a_worker_aggregates_the_live_others_and_leaves_out_the_stale(tmp_path: Path) -> None:
    me, other, dead = (
        MetricsShare(tmp_path, 0),
        MetricsShare(tmp_path, 1),
        MetricsShare(tmp_path, 2),
    )
    other.publish(TWO)
    dead.publish(TWO)
    old = time.time() - STALE_S - 5
    os.utime(dead.path, (old, old))
    text = me.aggregate(ONE)
    assert 'spear_requests_total{operation="chat",instance="a"} 7' in text  # not 11
