"""Evaluation: scorers for answers, citations, formats and labels."""
