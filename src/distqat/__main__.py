"""`python -m distqat` is the `distqat` command."""

from distqat.cli import main

main()
