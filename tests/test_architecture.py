"""The package's shape, kept by tests (issue 14; docs/architecture.md draws it).

* Imports point down the layers below only: no upward import, so no circle,
  in ``nbmplock/`` (lazy imports inside functions included); no circle in
  ``bench/``.
* No module grows past ~500 lines unless the architecture says why.
* Every option is declared once (``nbmplock._options``) and taken by every
  entry point with the same default and the same error.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

import nbmplock
from nbmplock import _options

REPO = Path(__file__).resolve().parents[1]

#: Bottom to top; a module may import modules of lower layers only.
LAYERS = [
    {"_errors", "_text", "_sync", "_notify", "_dispatch", "_retry", "_fingerprint",
     "_ratelimit", "_crc"},
    {"_optional", "_wire", "_keys"},
    {"_backend", "_log", "_options", "_saver"},
    {"_state", "_worker", "_done"},
    {"_plan"},
    {"_read", "_validate", "_engine", "_dask_worker"},
    {"_store", "_dask", "_results", "_lifetime"},
    {"_runner"},
    {"_job"},
    {"_progress", "_panel"},
    {"_display", "_seed", "_magic"},
    {"_cli"},
    {"__init__", "__main__"},
]
#: Modules allowed over ~500 lines, and why (the same words as docs/architecture.md).
LONG_MODULES = {
    "_engine": "one class, the local backend: processes, pipes, sentinels, blame, stealing",
    "_dask": "one class, the Dask backend's driver side",
    "_runner": "the manager loop: dispatch, events, failures, the end of a run",
}
MAX_LINES = 500


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                found.update(name.split(".")[0] for name in names)
            elif node.module and node.module.split(".")[0] == package:
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_nbmplock_imports_point_down_the_layers_only():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    modules = sorted(p.stem for p in (REPO / "nbmplock").glob("*.py"))
    assert set(modules) == set(layer_of), "place every module in a layer (and in the doc)"
    upward = []
    for name in modules:
        for dep in _imports(REPO / "nbmplock" / f"{name}.py", "nbmplock"):
            if dep in layer_of and layer_of[dep] >= layer_of[name]:
                upward.append(f"{name} (layer {layer_of[name]}) imports {dep} "
                              f"(layer {layer_of[dep]})")
    assert not upward, upward


def test_bench_has_no_import_circle():
    graph = {p.stem: _imports(p, "bench") for p in (REPO / "bench").glob("*.py")}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        seen[node] = 1
        for dep in graph.get(node, ()):
            if seen.get(dep) == 1:
                pytest.fail("import circle in bench/: " + " -> ".join(path + [dep]))
            if dep not in seen:
                visit(dep, path + [dep])
        seen[node] = 2

    for node in graph:
        if node not in seen:
            visit(node, [node])


def test_no_module_is_over_500_lines_unless_the_architecture_says_why():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for path in (REPO / "nbmplock").glob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            assert path.stem in LONG_MODULES, f"{path.name} has {lines} lines"
            assert LONG_MODULES[path.stem] in doc, f"docs/architecture.md: say why {path.name}"


# -- one options record -------------------------------------------------------

def ok(item, shared_data, init_values):
    return item


#: A wrong value of each option, to compare the errors of every entry point.
BAD = {
    "save_callback": 5, "num_procs": 0, "save_batch": 0, "init_function": "init",
    "batch_size": -1, "errors": "ignore", "max_retries": -1, "item_timeout": 0,
    "chunk_size": "4", "start_method": "thread", "backend": 5, "keep_results": "yes",
    "key": 5, "on_change": "ignore", "concurrency": 0, "rate_limit": "ten/s",
    "retry_delay": -1, "retry_on": "ValueError",
}
SEED = {"mp_lock": nbmplock.mp_lock, "mp_lock_value": nbmplock.mp_lock_value,
        "mp_lock_batch": nbmplock.mp_lock_batch}


def test_every_option_is_declared_once_and_described():
    names = _options.Options.names()
    assert set(BAD) | {"shared_data"} == set(names), "a new option needs a bad value here"
    for f in fields(_options.Options):
        assert _options.opt_of(f).help, f.name
    doc = nbmplock.Job.__doc__
    assert all(f"{name} : default" in doc for name in names)


@pytest.mark.parametrize("name", _options.Options.names())
def test_every_entry_point_takes_the_option_with_the_same_default_and_error(name, tmp_path):
    for entry in (nbmplock.Job, nbmplock.run):
        param = inspect.signature(entry).parameters[name]
        assert param.default == _options.default(name), (entry, name)
    seed = name in _options.Options.names(seed=True)
    for fn in SEED.values():
        params = inspect.signature(fn).parameters
        if name in params and params[name].default is not inspect.Parameter.empty:
            assert params[name].default == _options.default(name, seed=True), (fn, name)
    if name not in BAD:
        return
    errors = set()
    with pytest.raises(nbmplock.InvalidArgumentsError) as info:
        nbmplock.Job(["a"], ok, str(tmp_path / "job"), **{name: BAD[name]})
    errors.add(str(info.value))
    with pytest.raises(nbmplock.InvalidArgumentsError) as info:
        nbmplock.run(["a"], ok, str(tmp_path / "run"), **{name: BAD[name]})
    errors.add(str(info.value))
    for api, fn in SEED.items():
        args = {"data_list": ["a"], "process": ok, "save_callback": None, "num_procs": 1,
                "out_path": str(tmp_path / api), "verbose": False, name: BAD[name]}
        if api == "mp_lock_batch":
            args.setdefault("batch_size", 2)
        with pytest.raises(nbmplock.InvalidArgumentsError) as info:
            fn(**args)
        if seed:
            errors.add(str(info.value))
        else:  # not an option of mp_lock & co.: refused as such, by name
            assert info.value.argument == name or name == "batch_size", info.value
    assert len(errors) == 1, errors
    assert not any(tmp_path.iterdir()), "a bad option must be refused before any work"


def test_the_magic_has_a_flag_for_every_option_with_one():
    pytest.importorskip("IPython")
    from nbmplock._magic import MplockMagics

    parser = MplockMagics.mplock.parser
    flags = {option for action in parser._actions for option in action.option_strings}
    for f in fields(_options.Options):
        opt = _options.opt_of(f)
        if opt.flag is not None:
            assert opt.flag in flags, f.name
            action = next(a for a in parser._actions if opt.flag in a.option_strings)
            assert action.dest == f.name and opt.help.split(";")[0][:40] in action.help
