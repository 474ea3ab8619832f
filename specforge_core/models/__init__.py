"""Models: the target wrapper (aux hidden states) and the EAGLE3 draft."""
