"""Data sets for the accuracy track: generators (made here, seeded) and loaders of real files.

``bench/tasks`` turns them into the ``task=`` choices (how a config reads, trains and scores them)."""
