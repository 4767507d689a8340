"""Control plane: the kopf operator that reconciles K2Deployment resources."""
