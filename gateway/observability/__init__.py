"""How the running service is seen: the middleware that watches each request, the ledger and the usage writer process
it feeds (usage rows stored through ``gateway.accounting``, the access log, the counts), Prometheus metrics, JSON
logs."""
