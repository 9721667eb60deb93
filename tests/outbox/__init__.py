"""Publishing, error files, permissions, duplicates and the output check."""
