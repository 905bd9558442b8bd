"""Evidence: synthetic phantoms, the active-learning benchmark and the demo."""
