"""Background jobs: spawn, track in SQLite, cancel, logs and metrics.

`runner.JobRunner(workspace)` is the API (submit / get / status / list_jobs / cancel / resume /
log_tail / progress / metrics) and `runner.jobs_command` the `specforge-wb jobs` command;
`store.JobStore` is the registry; `wrap` is the tiny parent process that records each job's exit
status. This package imports nothing on its own, so `python -m specforge_core.jobs.wrap` (started
for every job) loads only what it needs.
"""
