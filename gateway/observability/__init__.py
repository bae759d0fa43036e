"""How the running service is seen: Prometheus metrics, JSON logs, and the middleware that feeds both."""
