#!/usr/bin/env python
"""`python start_servers.py [options]` is `distqat servers [options]` (the script name of the original docs)."""

import sys

from distqat.cli import app

if __name__ == "__main__":
    app(["servers", *sys.argv[1:]], prog_name="start_servers.py")
