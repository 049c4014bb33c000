"""Worker processes and their harness for the scale-out tests and benchmark (issue 8)."""
