"""The core runs without its optional extras: h11 (webhooks), hiredis (Redis), PyJWT (auth). Each is imported only
where it is needed, so ``pip install selectws`` alone serves WebSockets. Checked in a subprocess where importing
the extra fails, as it does when it is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # import fails: not installed\n"


@pytest.mark.parametrize("names", [("h11",), ("hiredis",), ("jwt",), ("h11", "hiredis", "jwt")])
def test_the_daemon_imports_and_answers_version_without(names):
    code = BLOCK.format(names=list(names)) + (
        "import runpy\n"
        "import selectws.server.server, selectws.app.cli  # the whole serve path\n"
        "sys.argv = ['selectws', '--version']\n"
        "runpy.run_module('selectws', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("selectws, version")
