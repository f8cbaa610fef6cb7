"""docs/benchmarks.md is what bench.report makes of the committed results, and the shared
percentile helper means what it says."""

from __future__ import annotations

import pytest

from bench import report
from bench.stats import percentile, summary_ms


def test_benchmarks_doc_is_generated_from_the_committed_results() -> None:
    assert report.DOC.read_text(encoding="utf-8") == report.render(report.load()), (
        "docs/benchmarks.md is stale: run `python -m bench.report`"
    )


def test_every_p95_in_the_results_rests_on_at_least_20_samples() -> None:
    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("p95_ms") is not None:
                assert node["n"] >= 20, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    results = report.load()
    assert {"at", "euicc", "mqtt", "detect", "failover", "daemon"} <= set(results)
    walk(results)


def test_nearest_rank_percentiles() -> None:
    samples = [float(i) for i in range(1, 21)]
    assert percentile(samples, 50) == 10.0
    assert percentile(samples, 95) == 19.0  # not the maximum
    assert percentile(samples, 100) == 20.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_summary_withholds_percentiles_without_enough_samples() -> None:
    few = summary_ms([5.0, 1.0, 3.0])
    assert (few["n"], few["p50_ms"], few["p95_ms"], few["p99_ms"], few["max_ms"]) == (
        3,
        3.0,
        None,
        None,
        5.0,
    )
    enough = summary_ms([float(i) for i in range(100)])
    assert (enough["p95_ms"], enough["p99_ms"]) == (94.0, 98.0)


def test_report_renders_missing_figures_as_a_dash() -> None:
    text = report.render({"mqtt": {"bridge": {"n": 3, "p50_ms": 1.0, "p95_ms": None}}})
    assert "| MqttBridge.publish_state | 3 | 1 | – |" in text
    assert "No `bench/results/at.json` committed." in text
