"""``make bench``: the whole suite, then every target with met / not met.

Sizes that fit the suite in 15 minutes on a 2-core machine: intake, the ledger's cost per
attempt and end to end 3 runs each, drain 3 runs of 2,000 alerts, one storm of 10,000 alerts. ``--full`` runs the issue's sizes
(drain 10,000, three storms), which takes longer; ``--smoke`` runs each script with tiny
numbers (what ``make test`` does: no figure from it means anything).

    .venv/bin/python -m bench.suite [--full | --smoke]
"""

from __future__ import annotations

import argparse
import json
import time

from bench import intake, ledger, storm, telemetry, worker
from bench.harness import RESULTS, Report


def main(argv: list[str] | None = None) -> list[Report]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true")
    size.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.smoke:
        reports = [
            intake.main(["--runs", "1", "--seconds", "1", "--connections", "4"]),
            ledger.main(["--runs", "1", "--attempts", "20"]),
            worker.main(["--runs", "1", "--rates", "20", "--seconds", "1", "--drain", "40"]),
            storm.main(["--runs", "1", "--alerts", "100"]),
            telemetry.main(["--runs", "1", "--seconds", "1", "--connections", "4", "--drain", "40"]),
        ]
    else:
        reports = [
            intake.main(["--runs", "3", "--seconds", "6"]),
            ledger.main(["--runs", "3", "--attempts", "1000"]),
            worker.main(["--runs", "3", "--seconds", "8", "--drain", "10000" if args.full else "2000"]),
            storm.main(["--runs", "3" if args.full else "1", "--alerts", "10000"]),
            telemetry.main(["--runs", "3", "--seconds", "6", "--drain", "2000"]),
        ]
    print(f"\n== targets ({time.monotonic() - started:.0f} s) ==")
    for report in reports:
        for target in report.targets:
            print(f"  {target.line()}")
    summary = {r.script: json.loads((RESULTS / f"{r.script}.json").read_text()) for r in reports}
    (RESULTS / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    return reports


if __name__ == "__main__":
    main()
