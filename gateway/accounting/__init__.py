"""Who used what: the per-request record, the usage log writer and its spool, usage reports."""
