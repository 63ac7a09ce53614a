"""Storage Commitment transactions and their reports: ``commitments``.

A delivery that asks for Storage Commitment (PS3.4 Annex J) records its Transaction UID
before the N-ACTION; the node's main listener, which may be another process than the
delivering worker, records the N-EVENT-REPORT in the same row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``commitments``."""
    op.create_table(
        "commitments",
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("peer_ae", sa.String(length=16), nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("reported_at", TS, nullable=True),
        sa.Column("event_type", sa.Integer(), nullable=True),
        sa.Column("committed", sa.Text(), nullable=True),
        sa.Column("failed", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("transaction_uid", name=op.f("pk_commitments")),
    )
    op.create_index(op.f("ix_commitments_requested_at"), "commitments", ["requested_at"],
                    unique=False)


def downgrade() -> None:
    """Drop ``commitments``."""
    op.drop_index(op.f("ix_commitments_requested_at"), table_name="commitments")
    op.drop_table("commitments")
