"""Post-training OOD evaluation: features, scorers, metrics, CLP, reports and plots."""
