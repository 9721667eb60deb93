"""System tests: real subprocesses, SIGKILL, PostgreSQL, systemd, Docker, FUSE."""
