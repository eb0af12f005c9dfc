"""Classification losses: surrogates of the 0-1 loss, their consistency, robustness and calibration."""
