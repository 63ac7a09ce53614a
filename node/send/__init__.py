"""Where a report leaves: C-STORE to the PACS destinations and Storage Commitment (PS3.4
Annex J) of what was sent.

The commitment reports the destinations send back arrive through :mod:`node.receive`.
"""
