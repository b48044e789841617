"""PostgreSQL wire protocol: the sans-I/O codec and the session."""
