"""Remove redundant neurons of trained networks without retraining."""
