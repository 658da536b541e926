"""The service shell: group-committed ingestion, timers, reloading, the active stores."""
