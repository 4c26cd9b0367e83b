"""contrastood: contrastive training for out-of-distribution detection (Winkens et al. 2020)."""

__version__ = "0.1.0"
