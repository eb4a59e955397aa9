"""The method: ECT pair schedule, losses, augmentations, sampling, EMA."""
