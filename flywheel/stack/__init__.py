"""The local supervisor of `flywheel up`: the embedded stack as child processes on one machine.

`supervisor` starts, watches and stops the stack; `launch` starts each of its children (command, environment,
readiness); `processes` starts and stops single servers (MLflow, Prefect);
`local` is the embedded default (state dir, process environment, a tracking server when none is configured).
Part of the top layer: only `flywheel.cli` imports it.
"""
