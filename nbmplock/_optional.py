"""Optional dependencies: imported where they are used, with an error naming the extra.

``import nbmplock`` imports none of them. Each function returns the module or
raises :class:`~nbmplock.MissingDependencyError` with the ``pip install`` line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._errors import MissingDependencyError

_EXTRAS = {
    "distributed": ("the Dask backend", "dask"),
    "ipywidgets": ("the nbmplock panel", "notebook"),
    "IPython": ("the %%mplock magic", "notebook"),
    "pandas": ("Job.to_pandas()", "pandas"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` (one of the optional dependencies) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what, extra = _EXTRAS[module]
        raise MissingDependencyError(
            f'{what} needs the "{module}" package; install it with '
            f'pip install "nbmplock[{extra}]"', name=module) from exc
