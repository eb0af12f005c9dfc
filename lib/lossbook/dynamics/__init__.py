"""Training dynamics: theorems about how optimizers move (rates, regimes, limits), stated, derived and checked by running them."""
