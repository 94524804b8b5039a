"""pytest plugin for the GPU check: one JSON line per test as it starts and as it ends, appended to the file
named by $GPU_CHECK_TESTS_JSONL, so a run stopped at its budget keeps every outcome it had, and names the
test it was in. Loaded with ``-p pytest_results`` (bench/ on PYTHONPATH)."""

from __future__ import annotations

import json
import os

import report

if report.fault():  # the GPU check's --fault: wrong Triton heads, patched before any test module imports them
    report.break_triton_heads()


def _write(record: dict) -> None:
    path = os.environ.get("GPU_CHECK_TESTS_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write({"test": nodeid, "outcome": "started"})


def pytest_runtest_logreport(report):
    # the call phase's outcome; a setup or teardown that fails is an error, a skip in setup is the skip
    if report.when == "call" or (report.when == "setup" and not report.passed) or (report.when == "teardown" and report.failed):
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2]).removeprefix("Skipped: ")
        else:
            lines = (report.longreprtext or "").strip().splitlines()
            errors = [line for line in lines if line.startswith("E ")]
            message = (errors[0][1:].strip() if errors else lines[-1] if lines else "")
        _write({"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 2), "message": message[:300]})


def pytest_collectreport(report):
    # a module skipped as a whole at import (a module-level pytest.importorskip) runs none of its tests: a skip
    # the GPU check counts like any other; a module that fails to import is an error
    if report.skipped or report.failed:
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2]).removeprefix("Skipped: ")
        else:
            message = ((report.longreprtext or "").strip().splitlines() or [""])[-1]
        _write({"test": report.nodeid, "outcome": "skipped" if report.skipped else "error", "seconds": 0.0,
                "message": message[:300]})
