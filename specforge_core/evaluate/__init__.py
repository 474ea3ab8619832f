"""Evaluation: in-process speculative decoding, SGLang benchmark client, benchmark sets, servers."""
