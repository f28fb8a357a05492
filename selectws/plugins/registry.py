"""Finding plugin classes by name.

A plugin name in the config is looked up, in this order, among the built-ins, in the ``selectws.plugins``
entry-point group (so a package can ship plugins by declaring them), and as a dotted path
``package.module:Class``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from selectws.plugins.api import Plugin

__all__ = ["BUILTIN_PLUGINS", "PluginNotFound", "find_plugin"]

BUILTIN_PLUGINS = {
    "echo": "selectws.plugins.echo:EchoPlugin",
    "broadcast": "selectws.plugins.broadcast:BroadcastPlugin",
    "chat": "selectws.plugins.chat:ChatPlugin",
}


class PluginNotFound(LookupError):
    """No plugin of that name, or the name does not lead to a Plugin subclass."""


def _load_dotted(path: str) -> object:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginNotFound(f"{path!r} is not of the form package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginNotFound(f"cannot import {module_name!r}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginNotFound(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def find_plugin(name: str) -> type[Plugin]:
    """The plugin class called ``name``; raises :class:`PluginNotFound` with the reason."""
    if name in BUILTIN_PLUGINS:
        obj = _load_dotted(BUILTIN_PLUGINS[name])
    else:
        found = [ep for ep in entry_points(group="selectws.plugins") if ep.name == name]
        if found:
            try:
                obj = found[0].load()
            except Exception as exc:
                raise PluginNotFound(f"entry point {name!r} failed to load: {exc}") from exc
        elif ":" in name:
            obj = _load_dotted(name)
        else:
            raise PluginNotFound(
                f"no built-in ({', '.join(sorted(BUILTIN_PLUGINS))}), no entry point, and not a module:Class path"
            )
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise PluginNotFound(f"{name!r} is not a selectws.plugins.api.Plugin subclass")
    return obj
