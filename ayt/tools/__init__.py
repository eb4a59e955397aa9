"""Command-line tools around the pipeline (``python -m ayt.tools.<name>``)."""
