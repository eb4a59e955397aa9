"""Training: shared step, single-process loop, pretraining, feature map, Ray Train."""
