"""Evaluation: prompt suites, detectors and scores for generated images."""
