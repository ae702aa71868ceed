"""`python -m pipeline ...` is the `skutag` command."""

from pipeline.cli import main

main()
