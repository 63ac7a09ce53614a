"""Modality Performed Procedure Steps: ``mpps_steps`` and the series they reference.

A step received by the MPPS SCP (PS3.4 Annex F.7, :mod:`node.receive.mpps`) is kept so that its
N-SET can arrive after a restart, and the series its Performed Series Sequence lists
are closed by the completion monitor once the step is COMPLETED or DISCONTINUED.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``mpps_steps`` and ``mpps_series``."""
    op.create_table(
        "mpps_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpps_steps")),
        sa.UniqueConstraint("sop_uid", name=op.f("uq_mpps_steps_sop_uid")),
    )
    op.create_table(
        "mpps_series",
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uids", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("done_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["step_id"], ["mpps_steps.id"],
                                name=op.f("fk_mpps_series_step_id_mpps_steps")),
        sa.PrimaryKeyConstraint("step_id", "series_uid", name=op.f("pk_mpps_series")),
    )
    op.create_index(op.f("ix_mpps_series_series_uid"), "mpps_series", ["series_uid"],
                    unique=False)


def downgrade() -> None:
    """Drop both tables."""
    op.drop_index(op.f("ix_mpps_series_series_uid"), table_name="mpps_series")
    op.drop_table("mpps_series")
    op.drop_table("mpps_steps")
