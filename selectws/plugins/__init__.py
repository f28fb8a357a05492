"""Plugin API, registry and built-in plugins."""
