"""Request plane: gRPC router, chain store and OpenAI-compatible HTTP front."""
