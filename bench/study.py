"""What the anatomy studies (``bench.w2_anatomy``, ``bench.w3_anatomy``) share: writing
their report, as a study of ``python -m bench`` or from their own command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional

#: ``anatomy(n_items, repeats, workers) -> Markdown``
Anatomy = Callable[[int, int, int], str]


def write(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def regenerate(anatomy: Anatomy, results: Path, out_dir: Path, *, quick: bool, workers: int,
               repeats: Optional[int], items: int, quick_items: int) -> Path:
    """Write *results*' file name into *out_dir* (a study of ``python -m bench``)."""
    text = anatomy(quick_items if quick else items, repeats or (3 if quick else 7), workers)
    return write(text, out_dir / results.name)


def main(anatomy: Anatomy, results: Path, prog: str, doc: str, items: int,
         argv: list[str] | None) -> int:
    """``python -m bench.<study> [--repeats 7] [--workers 2] [--items N]``: into *results*."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=items)
    args = parser.parse_args(argv)
    text = anatomy(args.items, args.repeats, args.workers)
    write(text, results)
    print(text + f"\nwrote {results}")
    return 0
