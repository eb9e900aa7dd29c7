"""A module that is imported on first attribute access, so a command's ``--help`` path stays JAX-free."""
from __future__ import annotations

import importlib


class LazyModule:
    """Stand-in for ``import NAME``: the module is imported when an attribute is first read.

    ``jnp = LazyModule("jax.numpy")`` then ``jnp.zeros(3)`` imports ``jax.numpy`` at that call;
    later reads are a ``sys.modules`` look-up. Module-level code must not read attributes (that
    would import at once).
    """

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__dict__["_name"]), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_name']!r}>"
