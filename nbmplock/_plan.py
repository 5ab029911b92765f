"""What a run has left to do: which positions of its item list, and how many are done.

The item list is known by its keys (:mod:`nbmplock._keys`) and their hash. The
log says which positions are done (:func:`nbmplock._log.done_mask`); here
that becomes the positions to run, in order, each distinct key once, with
the counts the Job shows. Used by the runner (with the directory locked) and
by a Job shown before it starts (without the lock).
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, islice

from ._fingerprint import JOINED, encode_keys
from ._keys import check_same
from ._done import done_mask
from ._log import Contents


#: Up to this many keys, the encoding made with the hash is kept for the LIST record.
KEEP_PAYLOAD = 1_000_000


class ItemList:
    """A job's items and their keys, as checked once when the job is created.

    ``hash`` identifies the list; ``payload`` is the keys' encoding for the
    log's LIST record (made with the hash; dropped once written).
    """

    __slots__ = ("items", "keys", "hash", "payload", "_repeats", "_legacy")

    def __init__(self, items: Sequence, keys: Sequence, hash: str, repeats: dict | None,
                 payload: list | None = None):
        self.items, self.keys, self.hash, self.payload = items, keys, hash, payload
        self._repeats = repeats
        self._legacy: str | None = None

    @classmethod
    def of(cls, items: Sequence, keys: Sequence) -> ItemList:
        """Refuses two different items with one key (:class:`InvalidArgumentsError`).

        When the items are their own keys (``str`` items without ``key=``), two
        items with one key are equal, so there is nothing to refuse: the repeats
        are found only when asked for (a resume of a finished run never asks).
        """
        own = keys is items  # compute_keys gives the list itself only when all are str
        # A long list's encoding is not kept (made again when the LIST record is
        # written): held through planning, it would sit beside the repeats' set.
        list_hash, payload = encode_keys(keys, all_str=own, keep=len(keys) <= KEEP_PAYLOAD)
        made = cls(items, keys, list_hash, None, payload)
        if not own:
            made._find_repeats()
        return made

    def known_as(self, recorded: str | None) -> bool:
        """Whether ``recorded``, a list hash that a run directory holds, is this list's.

        Releases before the NUL-joined encoding hashed a list of ``str`` keys
        otherwise (:func:`nbmplock._fingerprint.encode_keys`). When ``recorded``
        is that older hash of these very keys, the list goes by it from now on:
        the directory's records, and those this run adds, keep one hash.
        """
        if recorded is None or recorded == self.hash:
            return recorded is not None
        if not self.hash.startswith(JOINED) or recorded.startswith(JOINED):
            return False
        if self._legacy is None:  # once per list, and only for such a directory
            self._legacy = encode_keys(self.keys, keep=False, legacy=True)[0]
        if recorded != self._legacy:
            return False
        self.hash = recorded
        return True

    def recognize(self, contents: Contents) -> None:
        """Take the hash under which ``contents`` (a run directory's log) recorded
        this list, if that is an older release's hash of it (see :meth:`known_as`)."""
        if contents.complete is not None and self.known_as(contents.complete[0]):
            return
        for recorded in contents.lists:
            if self.known_as(recorded):
                return

    def _find_repeats(self) -> dict:
        repeats: dict = {}
        keys = self.keys
        if not self._distinct_by_order() and len(set(keys)) != len(keys):
            first: dict = {}
            for i, k in enumerate(keys):
                j = first.setdefault(k, i)
                if j != i:
                    check_same(self.items, keys, j, i)
                    repeats[i] = j
        self._repeats = repeats
        return repeats

    def _distinct_by_order(self) -> bool:
        """Whether the order of the list shows that its keys are distinct (see
        :func:`strictly_monotonic`): the keys', or for plain int items (keyed
        ``b"i<n>"``, one key per int, which do not sort as the numbers do) the ints'."""
        keys, items = self.keys, self.items
        if strictly_monotonic(keys):
            return True
        return (keys is not items and type(keys[0]) is bytes and type(items[0]) is int
                and operator.countOf(map(type, items), int) == len(items)
                and strictly_monotonic(items))

    @property
    def repeats(self) -> dict:
        """Positions whose key came earlier in the list (they run once, with the
        first), each mapped to that first position; empty when keys are distinct."""
        repeats = self._repeats
        return self._find_repeats() if repeats is None else repeats

    @property
    def distinct(self) -> int:
        return len(self.keys) - len(self.repeats)


def strictly_monotonic(keys: Sequence) -> bool:
    """Whether ``keys`` strictly increase (or strictly decrease) along the list.

    Then no two are equal, and no hash set of them is needed to know it: one
    pass of comparisons in C, about half the time of the set on 200,000 short
    ``str`` keys, and none of the set's 8 MiB of fresh memory. Lists are often
    sorted (ids from ``range``, ``sorted(glob(...))``, a sorted index); pandas'
    ``Index.is_unique`` takes the same shortcut. An unsorted list stops at its
    first step the wrong way; keys that cannot be compared (``str`` beside
    ``bytes``) are not monotonic.
    """
    if len(keys) < 2:
        return True
    try:
        step = operator.lt if keys[0] < keys[1] else operator.gt
        return all(map(step, keys, islice(keys, 1, None)))
    except TypeError:
        return False


@dataclass(frozen=True)
class Plan:
    total: int            # distinct items
    done_before: int      # of them, recorded done (with a value, when values are needed)
    failed: int           # of them, recorded failed and not done since
    pending: Sequence     # positions to run, in order (a range when nothing is done)
    no_value: int = 0     # done, but without a stored value: they run again for it


def make_plan(contents: Contents, items: ItemList, *, mode: str = "all",
              run: str | None = None, need_values: bool = False) -> Plan:
    """``run``: only what that fingerprint recorded counts as done (``on_change="rerun"``).
    ``need_values``: items done without a stored value run again (``mp_lock_value``)."""
    keys = items.keys
    items.recognize(contents)
    if contents.complete is not None and contents.complete[0] == items.hash and not (
            need_values or run is not None):
        distinct = contents.complete[2]  # as recorded: the repeats need not be found
        return Plan(distinct, distinct, 0, ())
    mask = done_mask(contents, keys, items.hash, run=run, need_results=need_values)
    repeats = items.repeats
    for i in repeats:
        mask[i] = 2  # runs with its first position: neither pending nor counted
    done = mask.count(1)
    no_value = 0
    if need_values:
        plain = done_mask(contents, keys, items.hash, run=run)
        for i in repeats:
            plain[i] = 0
        no_value = plain.count(1) - done  # done, but not with a value
    if not done and not repeats:
        pending: Sequence = range(len(keys))
    else:
        pending = array("q", compress(range(len(keys)), map(operator.not_, mask)))
    failures = contents.failures
    failed_keys = set()
    if failures:
        failed_keys = {keys[i] for i in pending if keys[i] in failures}
    if mode == "failed":
        pending = array("q", (i for i in pending if keys[i] in failed_keys))
    return Plan(items.distinct, done, len(failed_keys), pending, no_value)
