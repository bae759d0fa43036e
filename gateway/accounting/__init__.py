"""Who used what: the per-request record, token counts from streams, the usage recorder and its spool, usage reports."""
