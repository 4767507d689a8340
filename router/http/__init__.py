"""The OpenAI-compatible HTTP front of the router, and the K2 output parsing it relies on."""
