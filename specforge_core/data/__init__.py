"""Conversation data: schema and readers, dataset presets, chat templates and loss masks,
the tokenised cache and the draft vocabulary. The bottom of the engine: imports nothing above it."""
