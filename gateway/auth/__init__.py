"""Who is calling: bearer token to ``Identity``."""

from gateway.auth.base import Authenticator, Identity

__all__ = ["Authenticator", "Identity"]
