#!/usr/bin/env python3
"""Build the one-file mailproxy zipapp: `python3 packaging/build.py --output mailproxy.pyz`.

Deterministic: entries sorted, fixed timestamps and permissions, so the same sources always
give the same bytes. Holds mailproxy/*.py and a top-level __main__.py calling cli.main.
"""

import argparse
import os
import stat
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHEBANG = b"#!/usr/bin/env python3\n"
EPOCH = (1980, 1, 1, 0, 0, 0)
MAIN = b"""\
import sys

from mailproxy.cli import main

sys.exit(main(sys.argv[1:]))
"""


def sources(root=ROOT):
    """[(name in archive, path)] of the package's Python files, sorted."""
    pkg = os.path.join(root, "mailproxy")
    found = []
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                arc = os.path.relpath(path, root).replace(os.sep, "/")
                found.append((arc, path))
    return sorted(found)


def _entry(name):
    info = zipfile.ZipInfo(name, date_time=EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.create_system = 3          # unix, whatever the build host
    return info


def build(output, root=ROOT):
    entries = [("__main__.py", MAIN)]
    for arc, path in sources(root):
        with open(path, "rb") as f:
            entries.append((arc, f.read()))
    entries.sort()
    tmp = output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(SHEBANG)
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for name, data in entries:
                z.writestr(_entry(name), data, compress_type=zipfile.ZIP_DEFLATED,
                           compresslevel=9)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)
    return output


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", "-o", default=os.path.join(ROOT, "dist", "mailproxy.pyz"),
                    help="the zipapp to write (default: dist/mailproxy.pyz)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    build(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
