"""Sweeps on Ray Tune: the sweep grammar and trials (:mod:`.search`), Tune callbacks (:mod:`.callbacks`),
the console's trial table (:mod:`.progress`) and experiment trackers (:mod:`.tracking`). The driver and
its command line are :mod:`harness.sweep`."""
