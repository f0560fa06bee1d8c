"""Accounted communication: every collective/P2P call the project makes goes through here.

This is a leaf package (it imports only torch) so that every layer, attention/ included, can use
it without breaking the one-way dependency order launch -> runtime -> parallel -> attention -> models.
"""

from meshweave.comm.group import CommError, CommGroup, P2P, single_process_group
from meshweave.comm.ledger import CommLedger, OpStats

__all__ = ["CommError", "CommGroup", "CommLedger", "OpStats", "P2P", "single_process_group"]
