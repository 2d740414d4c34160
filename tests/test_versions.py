"""`-t` loads every module the start loads, so a Python the proxy cannot run on fails the check.

The zipapp goes to servers with whatever CPython 3.9-3.13 they ship; an incompatibility in a
module only the start imported used to pass `-t` and then stop the start. `.ci/run` runs these
tests (and a small selection of others) with every supported interpreter.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "mailproxy.ini"

# runs `-t` in this interpreter, optionally making one module unimportable first, and prints the
# mailproxy modules loaded afterwards
CHECK = """
import sys
blocked = sys.argv[1]

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == blocked:
            raise ImportError("cannot import %s on this Python" % name)
        return None

sys.meta_path.insert(0, Block())
from mailproxy.cli import main
rc = main(["-t", "-c", sys.argv[2]])
print(" ".join(sorted(m for m in sys.modules if m.startswith("mailproxy."))))
sys.exit(rc)
"""


def check(blocked="-"):
    return subprocess.run([sys.executable, "-c", CHECK, blocked, str(SAMPLE)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=30)


def package_modules():
    """mailproxy.X for each module, subpackages' modules included (mailproxy.config.loader)."""
    names = set()
    for p in (REPO / "mailproxy").rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__" and len(parts) > 1:
            names.add(".".join(parts))
    return names


def test_check_imports_every_module():
    r = check()
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr
    loaded = set(r.stdout.split())
    assert package_modules() - loaded == set()


def test_check_fails_when_a_module_cannot_load():
    # relay.py stands for any module the start needs and -t did not import
    r = check("mailproxy.relay")
    assert r.returncode == 1, r.stderr
    assert "cannot load the proxy's modules" in r.stderr
    assert "cannot import mailproxy.relay on this Python" in r.stderr
    assert "test failed" in r.stderr
    assert "test is successful" not in r.stderr
