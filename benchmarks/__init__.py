"""Benchmarks and experiments: entrypoints run as ``latentcell benchmark <name>``.

Library code never imports this package; each module here uses the library as a user would
and writes its measured figures into ``--out``.
"""
