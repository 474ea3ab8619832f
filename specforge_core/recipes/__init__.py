"""Recipes: a whole draft-training run (prompts -> answers -> train -> export -> evaluate) as one
resumable job over the engine's own jobs, described by a YAML file (`recipes/*.yaml`, or a user's)."""
