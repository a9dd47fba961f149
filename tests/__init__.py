"""The test suite, a package: modules import shared helpers as ``tests.helpers`` (and the expert-parallel
invariant as ``tests.ep_equivalence``), never through pytest's ``sys.path`` side effect."""
