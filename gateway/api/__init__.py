"""The OpenAI-compatible face of the gateway."""
