"""Optimizers and training algorithms, one module per paper: what each changes (the objective, the
oracle, the geometry, the parameterization) and what it costs."""
