"""Background jobs: spawn, track in SQLite, cancel, logs and metrics."""
