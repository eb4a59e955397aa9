"""The study report: its sections (`section.Section`), tables, plots and statistics."""
