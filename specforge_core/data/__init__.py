"""Conversation data: schema and readers, dataset presets, chat templates and loss masks,
the tokenised cache, the draft vocabulary and padded batches. The bottom of the engine: imports nothing above it."""
