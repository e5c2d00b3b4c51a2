"""Detection, models, training and evaluation."""
