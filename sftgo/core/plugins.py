"""A registry of named plug-ins: built-ins, objects registered in this process, and installed packages' entry points.

Input: a kind ("strategy", "objective"), the entry-point group installed packages declare them in
(`sftgo.strategies`, `sftgo.objectives`), the built-ins as "module:attribute" strings, and the protocol
(a `runtime_checkable` Protocol) every plug-in implements.
Output: `names()`, `get(name)`, `register(obj)`, `unregister(name)`.  A package makes a plug-in available
to every process that has it installed (the CLIs, the Dask workers, torchrun's ranks) by declaring, in its
pyproject.toml:

    [project.entry-points."sftgo.objectives"]
    focal = "my_package.focal:OBJECTIVE"

Cost: built-ins and entry points are imported on first use only (a tfidf build never imports torch);
listing the names reads the installed packages' metadata once per process.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

from sftgo.core.errors import SftgoError


class PluginError(SftgoError, ValueError):
    """A plug-in that cannot be used: an unknown or taken name, or an entry point that fails to load."""


class PluginShapeError(PluginError, TypeError):
    """An object that does not implement the plug-in protocol."""


@cache
def _entry_points(group: str) -> dict:
    found = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)  # the first installed distribution wins, as importlib.metadata orders them
    return found


class Registry:
    """The plug-ins of one kind (see the module docstring)."""

    def __init__(self, kind: str, group: str, builtin: dict[str, str], protocol: type, shape: str, extra_check=None):
        self.kind, self.group, self.builtin, self.protocol, self.shape = kind, group, builtin, protocol, shape
        self.extra_check = extra_check  # (obj, where) -> None, raising PluginError: what the protocol cannot say
        self.registered: dict[str, object] = {}
        self.loaded: dict[str, object] = {}

    def names(self) -> tuple[str, ...]:
        """Built-ins first, then those registered in this process, then installed entry points."""
        return tuple(dict.fromkeys([*self.builtin, *self.registered, *_entry_points(self.group)]))

    def check(self, obj, where: str):
        """`obj` if it implements the protocol and has a usable name, else PluginError naming `where`."""
        if not isinstance(obj, self.protocol):
            raise PluginShapeError(f"{where} does not implement the {self.kind} protocol ({self.shape}).")
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name or not name.replace("_", "").isalnum() or not name.isascii():
            raise PluginError(
                f"{where} has the name {name!r}; a {self.kind} needs a name of ASCII letters, digits and _."
            )
        if self.extra_check is not None:
            self.extra_check(obj, where)
        return obj

    def register(self, obj):
        """Make `obj` available by its name in this process (a built-in name cannot be taken)."""
        self.check(obj, repr(obj))
        if obj.name in self.builtin:
            raise PluginError(f"Cannot register a {self.kind} named {obj.name!r}: a built-in has that name.")
        self.registered[obj.name] = obj
        return obj

    def unregister(self, name: str) -> None:
        self.registered.pop(name, None)

    def get(self, name: str):
        if name in self.registered:
            return self.registered[name]
        if name in self.loaded:
            return self.loaded[name]
        if name in self.builtin:
            module, attr = self.builtin[name].split(":")
            obj = getattr(importlib.import_module(module), attr)
        elif name in _entry_points(self.group):
            ep = _entry_points(self.group)[name]
            where = f"The {self.kind} {name!r} (entry point {ep.value} of {ep.dist.name if ep.dist else 'a package'})"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken installed package: one sentence, naming it
                raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}.") from None
            self.check(obj, where)
            if obj.name != name:
                raise PluginError(
                    f"{where} is named {obj.name!r}; the entry point and the {self.kind} must have one name."
                )
        else:
            raise PluginError(f"Unknown {self.kind} {name!r}; choose from {', '.join(self.names())}.")
        self.loaded[name] = obj
        return obj
