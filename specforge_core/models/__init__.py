"""Models: the target wrapper (aux hidden states), the EAGLE3 draft, Medusa heads."""
