"""Batch jobs over files, exactly once and resumable: the runner, the file formats, the workers."""
