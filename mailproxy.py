#!/usr/bin/env python3
"""Run mailproxy from a checkout: `python3 mailproxy.py -c etc/mailproxy.ini`."""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path[0] != here:
        sys.path.insert(0, here)
    # the package directory next to this file wins over this module for `import mailproxy`
    from mailproxy.cli import main
    sys.exit(main(sys.argv[1:]))
