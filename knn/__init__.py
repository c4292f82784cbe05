"""The one neighbour search on feature tensors, below both the trainer's kNN monitor and feature_eval."""
