"""Offline hidden states: the store (format, writer, reader) and the dump job."""
