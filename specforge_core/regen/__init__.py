"""Regeneration: assistant turns re-written by the target through OpenAI-compatible servers."""
