"""Health, metrics, logs and explain: operating the daemon."""
