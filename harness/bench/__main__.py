"""``python -m harness.bench``: the benchmark (:mod:`harness.bench`), run by :func:`harness.bench.run.main`."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
