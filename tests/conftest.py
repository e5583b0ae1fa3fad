import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture
def registered_pass():
    """Register a pass for one test: `registered_pass("name", run, *params)`."""
    from evc.registry import PASSES, load_plugins, register_pass

    load_plugins()
    added = []

    def register(name, run, *params, check=None):
        register_pass(name, *params, check=check)(run)
        added.append(name)

    yield register
    for name in added:
        PASSES.pop(name, None)


def run_evc(*args, cwd=None, timeout=600):
    """Run the real CLI in a fresh process, as a user would."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "evc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
