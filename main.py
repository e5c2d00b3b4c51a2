#!/usr/bin/env python3
"""``python main.py ...``: the tastefeed command line, which lives in :mod:`bot.cli`."""
import sys

from bot.cli import main

if __name__ == "__main__":
    sys.exit(main())
