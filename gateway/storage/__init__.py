"""Database access with SQLAlchemy Core (async): SQLite by default, PostgreSQL in production."""
