"""Turn the fault suite's figures into the README's "Reliability" section.

    python -m pytest tests/faults && python -m tests.faults.figures

reads ``artifacts/reliability.json`` (written by tests/faults/conftest.py at the
end of a run) and prints the Markdown section to paste into README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "reliability.json"


def section(data: dict) -> str:
    rows = [
        ("driver processes SIGKILLed at random instants, then resumed",
         data.get("kills_survived", 0)),
        ("SIGKILLs that landed during log compaction", data.get("kills_during_compaction", 0)),
        ("items run through the kill loop", data.get("kill_loop_items", 0)),
        ("items saved twice (all were in flight at a kill; bound checked at every kill)",
         data.get("kill_loop_duplicates", 0)),
        ("most items in flight at one kill", data.get("max_in_flight_at_kill", 0)),
        ("byte offsets of last records truncated or corrupted", data.get("offsets_tried", 0)),
        ("faults injected in all (the kills and torn records above, worker segfaults, "
         "SIGKILLs, os._exit, hangs, unpicklable and huge results, MBs of output, full disk)",
         data.get("faults_injected", 0)),
        ("Stop / Force stop from another thread at random instants", data.get("stops", 0)),
        ("Ctrl-C (SIGINT) to a running script", data.get("interrupts", 0)),
        ("runs not killed that ended cleanly (each within its bound)",
         f"{data.get('runs_ended_cleanly', 0):,} of {data.get('runs_not_killed', 0):,}"),
        ("stops with a slow (0.5 s) or hung save_callback that took effect within one save",
         f"{data.get('stops_within_one_save', 0):,} of {data.get('stops_with_slow_save', 0) + data.get('stops_with_hung_save', 0):,}"),
        ("two runs started at the same instant on one out_path", data.get("two_writer_races", 0)),
        ("bad inputs refused before any work", data.get("bad_inputs_refused", 0)),
        ("**items lost**", f"**{data.get('items_lost', 0)}**"),
    ]
    tests = data.get("tests", {})
    lines = [
        f"From the last run of `tests/faults` ({sum(tests.values())} tests on "
        f"{data.get('cpus', '?')} cores, seed {data.get('seed')}, {data.get('when', '')[:10]}; "
        "the suite runs in CI on every change):",
        "",
        "| what the suite did | count |",
        "|---|---:|",
    ]
    lines += [f"| {what} | {count:,} |" if isinstance(count, int) else f"| {what} | {count} |"
              for what, count in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    try:
        data = json.loads(ARTIFACT.read_text())
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"no figures: run `python -m pytest tests/faults` first ({exc})\n")
        return 1
    sys.stdout.write(section(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
