"""Jobs record where their report is kept: ``jobs.report_path``.

The SR a job built is written to ``<home>/reports/<Study UID>/<SOP Instance UID>.dcm``
before delivery; the column holds that path relative to ``<home>/reports`` (null until
the SR is built).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the nullable ``jobs.report_path`` column."""
    op.add_column("jobs", sa.Column("report_path", sa.String(length=512), nullable=True))


def downgrade() -> None:
    """Drop ``jobs.report_path`` (batch mode: SQLite rebuilds the table)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("report_path")
