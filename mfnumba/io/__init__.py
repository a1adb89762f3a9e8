"""Readers and writers for frames, PSFs and results."""
