"""Robustness: objectives that keep a model accurate under heavy-tailed noise, outliers and input perturbations."""
