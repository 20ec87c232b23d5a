"""Test scaffolding shared by the tests, the benchmarks and the examples (never shipped).

Import as ``tests.support.<module>``: the checkout's root is on ``sys.path`` (the editable
install's path entry, or the working directory of ``python -m benchmarks``), and spawned
child processes inherit it, so their targets can live here too.
"""
