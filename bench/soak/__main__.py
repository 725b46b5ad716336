"""``python -m bench.soak``."""

import contextlib
import os

from bench.soak.cli import main

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    os._exit(130)
