"""`python3 -m mailproxy ...`"""

import sys

from mailproxy.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
