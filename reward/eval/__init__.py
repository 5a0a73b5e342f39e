"""Evaluation: generate with per-image seeds (`run`), score every image against its own prompt (`score`), and
summarise and compare runs with prompt-clustered intervals (`stats`)."""
