"""A study's results: the Parquet tables (:mod:`.aggregate`), the papers' table layouts (:mod:`.paper`) and
the comparison with the reference's released runs (:mod:`.reference_runs`). ``python -m harness.report``
writes the report from them."""
