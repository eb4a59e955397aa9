"""Evaluation: registered metrics (FID, KID, precision/recall, FD_DINOv2) through torch-fidelity, the
evaluation probe, and diagnostics measured on the model. Training calls evaluation, never the other way round."""
