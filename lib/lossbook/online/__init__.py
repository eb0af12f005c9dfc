"""Online learning: regret minimisation against stochastic, adversarial and in-between environments."""
