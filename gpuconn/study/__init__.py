"""The study runner: the study file, resume stamps, the steps, result queries, the report and the demo."""
