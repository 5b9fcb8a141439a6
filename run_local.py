#!/usr/bin/env python
"""`python run_local.py [options]` is `distqat local [options]` (the script name of the original docs)."""

import sys

from distqat.cli import app

if __name__ == "__main__":
    app(["local", *sys.argv[1:]], prog_name="run_local.py")
