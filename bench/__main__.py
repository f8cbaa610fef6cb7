"""`python -m bench [--quick] [--only NAME ...]`: run every bench/bench_*.py, print a table, write summary.json.

Each module runs in its own child process with a wall-clock limit, so one that hangs or
crashes cannot take the others (or their emulators and brokers) down with it. Modules are
called through whichever entry point they have: `run(quick=...)`, `run()` with its defaults,
or `async main(n)`; a missing or broken module is reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
SUMMARY = RESULTS_DIR / "summary.json"
# Modules named by the task but maybe not written yet; listed so their absence is reported.
EXPECTED = ("bench_at", "bench_euicc", "bench_mqtt", "bench_failover", "bench_daemon")
#: Sample counts for modules whose entry point is `async main(n)`: (quick, full).
MAIN_N: dict[str, tuple[int, int]] = {"bench_mqtt": (100, 1000), "bench_euicc": (5, 20)}
DEFAULT_MAIN_N = (5, 20)
#: Smaller keyword arguments for `run()` entry points that have no `quick` flag.
QUICK_KWARGS: dict[str, dict[str, Any]] = {"bench_at": {"iterations": 200}}
LIMIT_QUICK_S = 300.0
LIMIT_FULL_S = 900.0
#: Modules whose full run needs longer (bench_datapath: 20 failover rounds plus an idle window).
LIMIT_FULL_OVERRIDES_S: dict[str, float] = {"bench_datapath": 1500.0}
TERM_GRACE_S = 15.0
HEADLINE_MAX = 4


def discover() -> list[str]:
    """Module names of bench/bench_*.py, plus the expected ones that are missing."""
    found = {p.stem for p in BENCH_DIR.glob("bench_*.py")}
    return sorted(found | set(EXPECTED))


def call_entry(module: ModuleType, name: str, quick: bool) -> dict[str, Any]:
    """Run a module through the entry point it offers and return its result dict."""
    run = getattr(module, "run", None)
    if callable(run):
        params = inspect.signature(run).parameters
        kwargs: dict[str, Any] = {}
        if "quick" in params:
            kwargs["quick"] = quick
        elif quick:
            kwargs = {k: v for k, v in QUICK_KWARGS.get(name, {}).items() if k in params}
        result = run(**kwargs)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
    else:
        main = getattr(module, "main", None)
        if not inspect.iscoroutinefunction(main):
            raise TypeError(f"{name} has neither run() nor async main(n)")
        quick_n, full_n = MAIN_N.get(name, DEFAULT_MAIN_N)
        result = asyncio.run(main(quick_n if quick else full_n))
    if not isinstance(result, dict):
        raise TypeError(f"{name} returned {type(result).__name__}, not a dict")
    results_path = getattr(module, "RESULTS", None)
    if isinstance(results_path, Path):
        # Same file the module's own CLI writes, so both ways of running leave the same record.
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def headline(module: ModuleType, result: dict[str, Any]) -> dict[str, Any]:
    """The module's own headline() when it has one, else the first few p50 figures."""
    own = getattr(module, "headline", None)
    if callable(own):
        with contextlib.suppress(Exception):
            value = own(result)
            if isinstance(value, dict):
                return value
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if len(out) >= HEADLINE_MAX or not isinstance(node, dict):
            return
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, int | float) and "p50" in str(key):
                out[path] = value
                if len(out) >= HEADLINE_MAX:
                    return
            else:
                walk(path, value)

    walk("", result)
    return out


def child(name: str, quick: bool, out: Path) -> int:
    """Child-process side: import, run, write {"headline", "result_file"} to `out`."""
    sys.path.insert(0, str(ROOT))
    with contextlib.suppress(Exception):
        from agent import log as agent_log

        # Per-command debug events would dominate what is being measured.
        agent_log.configure("warning", json=True)
    module = importlib.import_module(f"bench.{name}")
    result = call_entry(module, name, quick)
    results_path = getattr(module, "RESULTS", None)
    record = {
        "headline": headline(module, result),
        "result_file": str(results_path.relative_to(ROOT))
        if isinstance(results_path, Path) and results_path.is_relative_to(ROOT)
        else None,
    }
    out.write_text(json.dumps(record))
    return 0


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM the child's process group (it leads it), then KILL what is left after a grace."""
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def run_one(name: str, quick: bool, limit_s: float) -> dict[str, Any]:
    """Run one module in a child process; its status, wall time, headline and any error."""
    if not (BENCH_DIR / f"{name}.py").exists():
        return {"status": "missing", "seconds": 0.0, "headline": {}}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        out = Path(tmp) / "result.json"
        log_path = Path(tmp) / "child.log"
        argv = [sys.executable, "-m", "bench", "--child", name, "--out", str(out)]
        if quick:
            argv.append("--quick")
        started = time.monotonic()
        with log_path.open("wb") as log:
            # Own session: on timeout the whole tree (emulator, broker, daemon) is stopped.
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
            try:
                rc: int | None = proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                rc = None
                _stop_group(proc)
        seconds = round(time.monotonic() - started, 1)
        tail = log_path.read_text(errors="replace")[-2000:]
        if rc is None:
            return {"status": "timeout", "seconds": seconds, "headline": {}, "error": tail}
        if rc != 0 or not out.exists():
            return {"status": "failed", "seconds": seconds, "headline": {}, "error": tail}
        data = json.loads(out.read_text())
        return {
            "status": "ok",
            "seconds": seconds,
            "headline": data["headline"],
            "result_file": data["result_file"],
        }


def table(rows: dict[str, dict[str, Any]]) -> str:
    """A short fixed-width table: module, status, seconds, headline figures."""
    lines = [f"{'benchmark':<16} {'status':<8} {'secs':>6}  headline"]
    for name, row in rows.items():
        figures = ", ".join(f"{k}={v}" for k, v in row["headline"].items()) or "-"
        lines.append(f"{name:<16} {row['status']:<8} {row['seconds']:>6.1f}  {figures}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when every present module succeeded."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds / shorter windows")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="e.g. failover daemon")
    parser.add_argument("--limit", type=float, default=None, help="seconds per module")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.quick, args.out)
    names = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        names = [n for n in names if n in wanted]
    limit = args.limit or (LIMIT_QUICK_S if args.quick else LIMIT_FULL_S)
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        own = None if args.quick or args.limit else LIMIT_FULL_OVERRIDES_S.get(name)
        rows[name] = run_one(name, args.quick, own or limit)
        if rows[name]["status"] in ("failed", "timeout"):
            print(rows[name].get("error", ""), file=sys.stderr, flush=True)
    summary = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "benchmarks": rows,
    }
    if args.only and SUMMARY.is_file():
        # A partial run updates its own rows and keeps the record of the others.
        with contextlib.suppress(ValueError, KeyError, TypeError):
            previous = json.loads(SUMMARY.read_text())
            summary["benchmarks"] = {**previous["benchmarks"], **rows}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    print(table(rows))
    print(f"summary: {SUMMARY.relative_to(ROOT)}")
    return 0 if all(r["status"] in ("ok", "missing") for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
