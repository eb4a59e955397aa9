"""Evaluation: FID with torch-fidelity."""
