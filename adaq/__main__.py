"""`python -m adaq` is the `adaq` command (device scripts run it under `timeout`, which cannot run a shell function)."""

from adaq.cli import main

main()
