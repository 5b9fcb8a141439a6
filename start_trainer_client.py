#!/usr/bin/env python
"""`python start_trainer_client.py [options]` is `distqat coordinator [options]` (the script name of the original docs)."""

import sys

from distqat.cli import app

if __name__ == "__main__":
    app(["coordinator", *sys.argv[1:]], prog_name="start_trainer_client.py")
