"""A small batch job that 02-resume-after-crash.ipynb starts and then kills.

Run as ``python crash_driver.py RUN_DIR N_ITEMS``: it "summarises" N_ITEMS
documents with two worker processes through the seed API (``mp_lock``),
appending one JSON line per finished item to ``RUN_DIR/data.jsonl``. The
notebook imports ``documents``, ``summarise`` and ``save`` from here, so its
resume is the very same call.
"""

from __future__ import annotations

import json
import sys
import time

from nbmplock import mp_lock

SECONDS_PER_ITEM = 0.02


def documents(n_items: int) -> list[str]:
    """The item list: one file name per document."""
    return [f"contracts/doc-{i:04d}.txt" for i in range(n_items)]


def summarise(item: str, shared_data: dict, init_values: dict) -> dict:
    """One item's work, in a worker: a stand-in for reading and summarising a file."""
    time.sleep(shared_data["seconds"])
    return {"words": 100 + len(item) * 7 % 50}


def save(output_filepath: str, data_results: list, data_names: list) -> None:
    """In the parent, one call per batch: append the batch to RUN_DIR/data.jsonl."""
    with open(output_filepath + ".jsonl", "a", encoding="utf-8") as f:
        for name, result in zip(data_names, data_results):
            f.write(json.dumps({"item": name, **result}) + "\n")


def main(run_dir: str, n_items: int):
    return mp_lock(documents(n_items), summarise, save, 2, run_dir,
                   shared_data={"seconds": SECONDS_PER_ITEM}, verbose=False)


if __name__ == "__main__":
    print(main(sys.argv[1], int(sys.argv[2])))
