"""Alembic migrations of the ledger (run programmatically by :mod:`node.ledger.db`)."""
