"""Telemetry's cost: intake and drain with tracing exported and JSON logs, against both off.

Each round measures, one after the other, on SQLite: the receiver's intake (3-alert webhooks,
wrk, 50 connections) and the drain of a recorded backlog, first with telemetry off
(``OTEL_SDK_DISABLED=true``, log level WARNING), then fully on (every span exported over OTLP
to a local endpoint, ``bench.otlp_sink``, with the SDK's batch processor; JSON logs at INFO).

    .venv/bin/python -m bench.telemetry [--runs 3] [--seconds 6] [--drain 2000]
"""

from __future__ import annotations

import argparse
import time

import httpx

from bench import intake, worker
from bench.harness import Bench, Report

MODES = {
    "off_": {"OTEL_SDK_DISABLED": "true", "RESPONDER_LOG_LEVEL": "WARNING"},
    "on_": {"RESPONDER_LOG_LEVEL": "INFO", "OTEL_BSP_SCHEDULE_DELAY": "1000"},
}


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--drain", type=int, default=2000)
    args = parser.parse_args(argv)
    report = Report("telemetry")
    with Bench("otlp") as sink_bench:
        sink = sink_bench.otlp_sink()
        MODES["on_"]["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink
        try:
            for i in range(args.runs):
                run = f"{int(time.time())}{i}"
                for tag, env in MODES.items():
                    Bench.telemetry = env
                    intake.measure_receiver(report, args, run + tag, "sqlite", duplicates=False, tag=tag)
                    worker.drain(report, args.drain, run + tag, "sqlite", tag=tag)
            exported = httpx.get(sink + "/count", timeout=5).json()
        finally:
            Bench.telemetry = {}
    if not exported["requests"]:
        raise SystemExit("bench: telemetry on exported no spans")
    report.add("otlp_exports", exported["requests"], name="OTLP exports received (on)", unit="requests")
    report.add("otlp_mib", exported["bytes"] / 2**20, name="OTLP data received (on)", unit="MiB")
    for name, key in (("intake", "sqlite_rps"), ("drain", "drain")):
        ratio = report.median("on_" + key) / report.median("off_" + key)
        report.add(f"{name}_ratio", ratio, name=f"{name}: telemetry on / off", unit="x")
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
