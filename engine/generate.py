"""Entry point of ``python -m engine.generate``; the CLI lives in ``engine.cli``.

Kept apart from ``engine.generation`` so that ``engine.generate`` stays the function.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
