"""The public namespace: exact, sorted, light to import."""

from __future__ import annotations

import subprocess
import sys

import nbmplock


def test_all_is_sorted_and_exact():
    assert nbmplock.__all__ == sorted(nbmplock.__all__)
    public = {name for name in vars(nbmplock) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(nbmplock, name)).__name__ == "module"}
    assert set(nbmplock.__all__) == public - modules - {"annotations"}


def test_seed_names_and_error_hierarchy():
    assert nbmplock.mp_lock_values is nbmplock.mp_lock_value
    assert issubclass(nbmplock.InvalidArgumentsError, ValueError)
    for name in nbmplock.__all__:
        obj = getattr(nbmplock, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not nbmplock.RemoteTraceback:
            assert issubclass(obj, nbmplock.NbmplockError), name
    err = nbmplock.InvalidArgumentsError("num_procs", "a positive int")
    assert str(err) == "Invalid num_procs. Expected values: a positive int"


def test_import_is_light():
    code = ("import sys, nbmplock; heavy = [m for m in ('ipywidgets', 'IPython', 'distributed', "
            "'tqdm') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_import_without_fcntl_says_what_is_supported():
    """On Windows ``fcntl`` does not exist: the ImportError says where nbmplock runs."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "try:\n    import nbmplock\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout
    assert "runs on Linux" in out and "not on Windows" in out and "WSL" in out, out
