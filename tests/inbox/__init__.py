"""Intake, routing, stability, polling: which files are ready and safe to take."""
