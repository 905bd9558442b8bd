"""The model a user brings: its card, loading it in every supported form, the embedded default, export."""
