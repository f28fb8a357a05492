"""Build configuration beyond pyproject.toml: the optional C accelerator for WebSocket masking.

``selectws/protocol/_speedups.c`` is an *optional* extension (the pattern of python-websockets' speedups.c): when
it cannot be compiled (no compiler, no Python headers) setuptools prints a warning and the install goes on, and
:mod:`selectws.protocol.frames` uses its pure-Python masking. ``SELECTWS_NO_SPEEDUPS=1`` at run time selects the
pure-Python path even when the extension is built; ``selectws --version`` says which one is active.

Rebuild an editable install after changing the C source:
``pip install -e . --no-deps --no-build-isolation`` (the compiled module lands next to the source).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "selectws.protocol._speedups",
            sources=["selectws/protocol/_speedups.c"],
            optional=True,
        )
    ],
)
