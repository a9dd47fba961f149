"""``python -m harness.aggregate FOLDER``: write a study's five Parquet tables (:mod:`harness.analysis.aggregate`)."""

import sys

from .analysis.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
