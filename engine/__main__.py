"""``python -m engine [generate|eval|serve] ...``: the ``gpt2engine`` command (generate by default)."""

import sys

from .cli import entry

if __name__ == "__main__":
    sys.exit(entry())
