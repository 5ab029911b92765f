"""Worker processes: death, timeouts, start methods, Ctrl-C, a killed driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import nbmplock
from nbmplock import WorkerDiedError, mp_lock, mp_lock_value
from nbmplock._read import read_contents

from .helpers import Saver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMS = [f"i{n:03d}" for n in range(60)]


def _crash(how):
    def process(item, shared, init):
        if item == "i013":
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "exit":
                os._exit(3)
            elif how == "segfault":
                import ctypes
                ctypes.string_at(0)
        return item
    return process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, exitcode, words", [
    ("sigkill", -signal.SIGKILL, "SIGKILL (possibly out of memory"),
    ("exit", 3, "exited with code 3"),
    ("segfault", -signal.SIGSEGV, "SIGSEGV"),
])
def test_dead_worker_fails_its_item_and_the_run_goes_on(tmp_path, how, exitcode, words):
    saver = Saver()
    summary = mp_lock(ITEMS, _crash(how), saver, 2, str(tmp_path), verbose=False,
                      errors="record", chunk_size=5)
    assert [f.item for f in summary.failures] == ["i013"]
    failure = summary.failures[0]
    assert failure.kind == "died" and failure.exitcode == exitcode and words in failure.message
    assert failure.worker_pid is not None
    assert sorted(saver.names) == sorted(set(ITEMS) - {"i013"})
    assert read_contents(str(tmp_path)).done == set(saver.names)


def _ran_where(item, shared, init):
    if item.startswith("slow"):
        time.sleep(0.3)
    return item, os.getpid()


def _ran_where_batch(items, shared, init):
    return [_ran_where(item, shared, init) for item in items]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [None, 2])
def test_an_idle_worker_takes_over_the_rest_of_a_slow_chunk(tmp_path, batch_size):
    """Work stealing: the first chunk holds every slow item. Without a give-back
    one worker runs all six while the other sits idle once the fast ones are done."""
    items = [f"slow-{n}" for n in range(6)] + [f"fast-{n:02d}" for n in range(30)]
    saved: list = []

    def save(path, results, names):
        assert [item for item, _ in results] == list(names)
        saved.extend(results)

    if batch_size:
        nbmplock.mp_lock_batch(items, _ran_where_batch, save, 2, str(tmp_path), batch_size,
                               verbose=False, chunk_size=6)
    else:
        mp_lock(items, _ran_where, save, 2, str(tmp_path), verbose=False, chunk_size=6)
    assert sorted(item for item, _ in saved) == sorted(items)  # every item, once
    slow_pids = {pid for item, pid in saved if item.startswith("slow")}
    assert len(slow_pids) == 2, "the slow items all ran in one worker"
    assert read_contents(str(tmp_path)).done == set(items)


@pytest.mark.timeout(60)
def test_dead_worker_raises_worker_died_error_by_default(tmp_path):
    with pytest.raises(WorkerDiedError, match="i013") as info:
        mp_lock(ITEMS, _crash("exit"), None, 2, str(tmp_path), verbose=False, chunk_size=4)
    assert info.value.exitcode == 3 and info.value.item == "i013"
    done = read_contents(str(tmp_path)).done
    assert "i013" not in done
    # resume with a fixed function completes everything
    summary = mp_lock(ITEMS, lambda i, s, v: i, None, 2, str(tmp_path), verbose=False)
    assert summary.skipped == len(done) and summary.done == len(ITEMS) - len(done)


@pytest.mark.timeout(60)
def test_init_runs_again_in_a_replacement_worker(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()

    def init(shared):
        (pids / str(os.getpid())).touch()
        return {}

    mp_lock(ITEMS, _crash("sigkill"), None, 1, str(tmp_path / "run"), verbose=False,
            errors="record", init_function=init)
    assert len(list(pids.iterdir())) == 2  # the first worker and its replacement


@pytest.mark.timeout(60)
def test_item_timeout_kills_the_slow_item_only(tmp_path):
    def process(item, shared, init):
        if item == "i005":
            time.sleep(600)
        return item

    summary = mp_lock(ITEMS[:20], process, None, 2, str(tmp_path), verbose=False,
                      errors="record", item_timeout=1.0)
    assert [f.item for f in summary.failures] == ["i005"]
    assert summary.failures[0].kind == "timeout"
    assert "item_timeout=1" in summary.failures[0].message
    assert summary.done == 19


@pytest.mark.timeout(60)
def test_item_timeout_raises_by_default(tmp_path):
    with pytest.raises(nbmplock.ItemTimeoutError):
        mp_lock(["slow"], lambda i, s, v: time.sleep(600), None, 1, str(tmp_path),
                verbose=False, item_timeout=0.5)


@pytest.mark.timeout(60)
def test_init_error_is_clear(tmp_path):
    def init(shared):
        raise KeyError("model weights missing")

    with pytest.raises(nbmplock.WorkerInitError, match="model weights missing") as info:
        mp_lock(ITEMS, lambda i, s, v: i, None, 2, str(tmp_path), verbose=False,
                init_function=init)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_main_lambdas_and_closures_under_every_start_method(tmp_path, method):
    script = textwrap.dedent(f"""
        import math, sys
        import nbmplock
        SCALE = 3
        def make(offset):
            return lambda item, shared, init: math.floor(len(item) * SCALE) + offset + init["k"]
        if __name__ == "__main__":
            out = nbmplock.mp_lock_value(["a", "bb", "ccc"], make(10), None, 2, sys.argv[1],
                                         init_function=lambda shared: {{"k": shared["k"]}},
                                         shared_data={{"k": 100}}, verbose=False,
                                         start_method="{method}")
            sys.stdout.write(repr(out))
    """)
    path = tmp_path / "main_script.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[113, 116, 119]"


@pytest.mark.timeout(60)
def test_unserialisable_function_under_spawn_is_a_clear_error(tmp_path):
    numbers = (n for n in range(3))  # generators cannot be pickled, even by dill

    def process(item, shared, init):
        return next(numbers)

    with pytest.raises(nbmplock.SerializationError, match="init_function"):
        mp_lock(["a"], process, None, 1, str(tmp_path), verbose=False, start_method="spawn")


def _driver(tmp_path, body: str) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate``; a driver that hangs prints every thread's stack first."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # faulthandler in the driver dumps its stacks
        time.sleep(0.5)
        proc.kill()
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"the driver hung for {timeout} s; its stacks:\n{stderr[-20000:]}")


DRIVER = """
    import os, signal, sys, time, json
    # SIGINT may be inherited ignored (started in the background): set the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hang explains itself
    import nbmplock
    OUT = {out!r}
    def process(item, shared, init):
        with open(os.path.join(OUT, "processed.txt"), "a") as f:
            f.write(item + "\\n")
        time.sleep(0.003)
        return item
    def save(path, results, names):
        with open(path + ".txt", "a") as f:
            f.write("".join(n + "\\n" for n in names))
    if __name__ == "__main__":
        items = [f"item-{{i:04d}}" for i in range({n})]
        nbmplock.mp_lock(items, process, save, 2, OUT, verbose=False, chunk_size=5)
        sys.stdout.write("complete")
"""


def _wait_for_progress(out, minimum):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.isdir(out) and len(read_contents(out).done) >= minimum:
            return
        time.sleep(0.05)
    raise AssertionError("the driver made no progress")


@pytest.mark.timeout(120)
def test_sigkill_of_the_driver_then_resume(tmp_path):
    out = str(tmp_path / "run")
    n = 600
    proc = _driver(tmp_path, DRIVER.format(out=out, n=n))
    _wait_for_progress(out, 100)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    psutil.wait_procs(children, timeout=10)  # PDEATHSIG: workers die with their parent
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    done_at_kill = read_contents(out).done
    assert 100 <= len(done_at_kill) < n
    processed_before = open(os.path.join(out, "processed.txt")).read().splitlines()
    with open(os.path.join(out, "processed.txt"), "w"):
        pass
    proc = _driver(tmp_path, DRIVER.format(out=out, n=n))
    stdout, stderr = _communicate(proc, 100)
    assert stdout == "complete", stderr
    rerun = open(os.path.join(out, "processed.txt")).read().splitlines()
    assert not set(rerun) & done_at_kill  # nothing recorded done ran again
    saved = open(os.path.join(out, "data.txt")).read().splitlines()
    assert set(saved) == {f"item-{i:04d}" for i in range(n)}
    # every item saved twice was in flight at the kill: bounded by the in-flight window
    twice = len(saved) - len(set(saved))
    assert twice <= 2 * 2 * 5 + 10
    assert set(processed_before) | set(rerun) == set(saved)


@pytest.mark.timeout(60)
def test_ctrl_c_stops_quickly_leaves_no_children_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    body = DRIVER.format(out=out, n=100000).replace("time.sleep(0.003)", "time.sleep(0.05)")
    proc = _driver(tmp_path, body)
    _wait_for_progress(out, 20)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    proc.send_signal(signal.SIGINT)
    stdout, stderr = _communicate(proc, 20)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr and "Run the same call again to resume" in stderr
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    done = read_contents(out).done
    saved = open(os.path.join(out, "data.txt")).read().splitlines()
    assert set(saved) == done


@pytest.mark.timeout(60)
def test_second_live_run_is_refused_and_dead_lock_does_not_block(tmp_path):
    out = str(tmp_path / "run")
    body = DRIVER.format(out=out, n=100000).replace("time.sleep(0.003)", "time.sleep(0.05)")
    proc = _driver(tmp_path, body)
    _wait_for_progress(out, 1)
    with pytest.raises(nbmplock.RunLockedError, match=f"process {proc.pid}"):
        mp_lock(["x"], lambda i, s, v: i, None, 1, out, verbose=False)
    assert nbmplock.read_snapshot(out).holder_pid == proc.pid
    proc.kill()
    proc.wait(10)
    time.sleep(0.5)  # let the workers die with their parent
    assert nbmplock.read_snapshot(out).holder_pid is None
    assert mp_lock_value(["x"], lambda i, s, v: i, None, 1, out, verbose=False) == ["x"]


def _half_mib(item, shared, init):
    return item.encode() * (512 * 1024 // len(item))


@pytest.mark.timeout(60)
def test_big_results_come_back_in_small_chunks_and_are_stored_whole(tmp_path):
    # Results of one chunk travel in one message: with 512 KiB results the
    # runner keeps chunks to about 1 MiB of results (2 items) instead of a
    # quarter of the work per chunk, so results stream. Each chunk is one DONE
    # record in the log, which shows the chunk sizes.
    items = [f"big{n:03d}" for n in range(60)]
    out = str(tmp_path / "out")
    results = mp_lock_value(items, _half_mib, None, 2, out, verbose=False)
    assert results == [_half_mib(i, None, None) for i in items]
    contents = read_contents(out, results=True)
    assert contents.done == set(items)
    assert contents.results == dict(zip(items, results))
    assert contents.records >= 30, contents.records  # 60 items in chunks of 1 or 2 (+COMPLETE)
    # a resumed call returns the stored results without running anything
    assert mp_lock_value(items, _crash("sigkill"), None, 2, out, verbose=False) == results


def _varied(item, shared, init):
    n = int(item[3:])
    size = (64 + (n * 37) % 700) * 1024  # 64 to 763 KiB: messages grow and shrink
    return (item.encode() + bytes([n % 251])) * (size // (len(item) + 1))


@pytest.mark.timeout(60)
def test_results_read_into_reused_buffers_stay_whole(tmp_path, monkeypatch):
    # The manager reads a worker's next results message into the buffer of an
    # earlier one once nothing else holds it (_engine._spare_buffer), resized to
    # each message. Every result must come back, and be stored, as it was made,
    # and the buffers must really be reused (a variable that keeps the last
    # event alive would silently stop it).
    from nbmplock import _engine
    taken = []  # reused or not (not the buffers: holding them would stop the reuse)
    real = _engine._spare_buffer

    def spy(worker):
        buf = real(worker)
        taken.append(buf is not None)
        return buf

    monkeypatch.setattr(_engine, "_spare_buffer", spy)
    items = [f"var{n:03d}" for n in range(150)]
    out = str(tmp_path / "out")
    results = mp_lock_value(items, _varied, None, 2, out, verbose=False)
    expected = [_varied(i, None, None) for i in items]
    assert results == expected
    assert read_contents(out, results=True).results == dict(zip(items, expected))
    assert sum(taken) >= len(taken) // 2, (sum(taken), len(taken))
    del taken[:]
    assert mp_lock_value(items, _crash("sigkill"), None, 2, out, verbose=False) == expected


def _one_huge(item, shared, init):
    return item.encode() * (20 * 2**20 // len(item)) if item == "h005" else item.encode() * 9000


@pytest.mark.timeout(60)
def test_the_buffer_of_a_huge_result_is_not_kept_for_the_rest_of_the_run(tmp_path, monkeypatch):
    # One item returns 20 MiB: its message's buffer is let go once handled,
    # not kept as a spare (and reused, resized) for the rest of the run.
    from nbmplock import _engine
    spares = []
    real = _engine._spare_buffer

    def spy(worker):
        spares.append(max(map(len, worker.rbufs), default=0))  # what the worker kept
        return real(worker)

    monkeypatch.setattr(_engine, "_spare_buffer", spy)
    items = [f"h{n:03d}" for n in range(40)]
    out = str(tmp_path / "out")
    results = mp_lock_value(items, _one_huge, None, 1, out, verbose=False)
    assert results == [_one_huge(i, None, None) for i in items]
    assert len(spares) > 5 and max(spares) < 20 * 2**20, spares  # never the huge one


def test_a_results_buffer_is_reused_only_when_nothing_else_holds_it():
    import types

    from nbmplock._crc import Pickled
    from nbmplock._engine import _spare_buffer
    worker = types.SimpleNamespace(rbufs=[Pickled(b"a"), Pickled(b"b")])
    held = worker.rbufs[0]  # say a chunk's event not handled yet
    got = _spare_buffer(worker)
    assert got is not held and bytes(got) == b"b"
    assert worker.rbufs == [held]
    assert _spare_buffer(worker) is None  # the one left is still held
    worker.rbufs.append(got)  # the manager keeps each message's buffer as a spare
    assert _spare_buffer(worker) is None  # "b" is held too, by `got`
    assert worker.rbufs == [got]  # at most two spares: the oldest goes
    del got
    assert bytes(_spare_buffer(worker)) == b"b"  # nothing else holds it now
    worker.rbufs = [held]
    del held
    assert bytes(_spare_buffer(worker)) == b"a"


def test_no_fork_warning_from_worker_starts(tmp_path):
    # Python 3.12+ warns on fork() in a process with threads (the manager thread
    # forks the workers); nbmplock hides that warning for its own forks only.
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mp_lock_value(ITEMS[:8], lambda i, s, x: i, None, 2, str(tmp_path / "o"),
                             verbose=False, start_method="fork") == ITEMS[:8]
    assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]


def _pid(item, shared_data, init_values):
    return os.getpid()


@pytest.mark.timeout(60)
def test_no_more_workers_than_units_of_work(tmp_path):
    """Issue 13, item 7: num_procs=64 for 3 items started 64 workers (8 s under spawn)."""
    pids = mp_lock_value(["a", "b", "c"], _pid, None, 64, str(tmp_path / "a"), verbose=False)
    assert len(set(pids)) <= 3
    started = []
    job = nbmplock.Job(["a", "b", "c", "d", "e"], _pid, str(tmp_path / "b"), num_procs=64,
                       batch_size=2)
    job.subscribe(lambda e: started.append(len(e.progress.in_flight_by_worker)))
    job.start()
    assert job.wait(30)
    assert max(started) <= 3  # 3 batches of 2: at most 3 workers


def _stop_between_header_and_results(flag: str):
    """A worker's ``_send_chunk`` (patched before the fork) that, once, SIGSTOPs
    its own process after sending a chunk's header and before its results."""
    from nbmplock import _worker
    real = _worker._send_chunk

    def send(conn, chunk_id, n_run, results, failures, seconds):
        if results and not os.path.exists(flag):
            with open(flag, "w"):
                pass
            real_send_bytes = conn.send_bytes
            sent = []

            def send_bytes(data):
                real_send_bytes(data)
                sent.append(len(data))
                if len(sent) == 1:  # the header is out; the results are not
                    os.kill(os.getpid(), signal.SIGSTOP)

            conn.send_bytes = send_bytes
            try:
                return real(conn, chunk_id, n_run, results, failures, seconds)
            finally:
                del conn.send_bytes
        return real(conn, chunk_id, n_run, results, failures, seconds)
    return send


@pytest.mark.timeout(90)
def test_a_worker_stopped_inside_a_message_does_not_stop_the_run_from_ending(tmp_path,
                                                                            monkeypatch):
    # A worker frozen (SIGSTOP, a debugger, a cgroup freezer) after it sent a
    # chunk's header and before its results: the manager must not sit in a read
    # of that message, or Force stop (which the manager carries out) and every
    # other wake-up would wait for it forever. The half-read message is held
    # per worker; Force stop kills the frozen worker and the run ends.
    from nbmplock import _worker
    flag = str(tmp_path / "stopped")
    monkeypatch.setattr(_worker, "_send_chunk", _stop_between_header_and_results(flag))
    items = [f"s{n:03d}" for n in range(40)]
    out = str(tmp_path / "out")
    job = nbmplock.Job(items, _half_mib, out_path=out, num_procs=1, keep_results=True,
                       start_method="fork")
    job.start()
    deadline = time.monotonic() + 30
    stopped = None
    while stopped is None and time.monotonic() < deadline:
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() == psutil.STATUS_STOPPED:
                    stopped = child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)
    assert stopped is not None, "the worker never stopped itself"
    time.sleep(0.5)  # the manager has read the header by now
    job.stop(force=True)
    assert job.wait(20), "Force stop did not end the run: the manager is stuck"
    assert not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE
    monkeypatch.undo()
    # nothing lost: a resume runs what was not recorded and returns every value
    assert mp_lock_value(items, _half_mib, None, 1, out, verbose=False) == \
        [_half_mib(i, None, None) for i in items]


def test_the_inbox_reassembles_messages_cut_at_any_byte_and_never_waits():
    # The manager's reader of a worker's pipe (_engine._Inbox): fed a byte
    # stream in pieces cut at every position, it returns each whole message
    # once complete, None (at once) while one is incomplete, and reads both
    # length framings of multiprocess.connection (int32, or -1 then uint64).
    import struct

    from nbmplock._engine import _Inbox
    messages = [b"a", b"", b"hello" * 1000, b"\x00\xff" * 33]
    stream = b""
    for i, m in enumerate(messages):
        stream += (struct.pack("!i", -1) + struct.pack("!Q", len(m)) if i % 2
                   else struct.pack("!i", len(m))) + m
    for cut in list(range(0, 40)) + [len(stream) - 1, len(stream) // 2]:
        r, w = os.pipe()
        try:
            os.set_blocking(r, False)
            inbox = _Inbox(r)
            got = []

            def drain():
                while True:
                    m = inbox.message(bytearray)
                    if m is None:
                        return
                    got.append(bytes(m))

            os.write(w, stream[:cut])
            drain()
            os.write(w, stream[cut:])
            drain()
            assert got == messages, cut
            os.close(w)
            w = None
            with pytest.raises(EOFError):
                inbox.message(bytearray)
        finally:
            os.close(r)
            if w is not None:
                os.close(w)


def _fail_f003(item, shared, init):
    if item == "f003":
        raise ValueError("f003 fails")
    return item.upper()


@pytest.mark.timeout(60)
def test_a_fresh_run_records_its_list_and_run_before_any_span_or_failure(tmp_path):
    # The log of a run into a fresh run directory reads LIST, RUN, then the
    # chunks' FAIL and SPAN records and END; job.json names the list; a resume
    # finds the list (no second LIST) and ends with a COMPLETE mark.
    from nbmplock import _log as log_format
    from nbmplock._fingerprint import encode_keys
    from nbmplock._read import read_fingerprint

    from .faults.test_torn_writes import records
    items = [f"f{n:03d}" for n in range(300)]
    out = tmp_path / "out"
    results = mp_lock_value(items, _fail_f003, None, 2, str(out), verbose=False,
                            errors="record")
    assert results == [None if i == "f003" else i.upper() for i in items]
    kinds = [k for _, _, k in records(out)]
    assert kinds[:2] == [log_format._LIST, log_format._RUN], kinds
    assert log_format._FAIL in kinds and kinds[-1] == log_format._END, kinds
    assert set(kinds[2:-1]) == {log_format._SPAN, log_format._FAIL}, kinds
    assert read_fingerprint(str(out)).items_hash == encode_keys(items)[0]
    again = mp_lock_value(items, lambda item, s, i: item.upper(), None, 2, str(out),
                          verbose=False)
    assert again == [i.upper() for i in items]
    kinds = [k for _, _, k in records(out)]
    assert kinds.count(log_format._LIST) == 1 and kinds[-1] == log_format._COMPLETE, kinds
