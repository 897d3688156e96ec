"""The `flywheel` command line (`main`, the Typer app), its CI report (`ci`) and the month-by-month demo (`demo`).

The top layer: nothing in Flywheel imports it.
"""
