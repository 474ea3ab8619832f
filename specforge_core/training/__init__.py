"""Training: the TTT loss, the trainer loop (online / offline), checkpoints, export, tracking."""
