"""Adapting the model: the fine-tuning recipe and trainer, selective pseudo-labels, and the session folder
that records every round."""
