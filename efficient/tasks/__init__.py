"""Data for the accuracy track: generators (made here, seeded) and loaders of real files."""
