"""One-off experiments behind docs/quality_experiments.md (and README's GPU numbers); see README.md here."""
