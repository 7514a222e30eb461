"""Empirical privacy audit: one training run with canaries gives a statistically valid lower bound on ε."""
