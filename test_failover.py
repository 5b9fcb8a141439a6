#!/usr/bin/env python
"""`python test_failover.py [options]` is `distqat failover-demo [options]` (the script name of the original docs).

Not a pytest module: the failover tests are in tests/integration/test_failover.py.
"""

import sys

from distqat.cli import app

if __name__ == "__main__":
    app(["failover-demo", *sys.argv[1:]], prog_name="test_failover.py")
