"""The foundation every package may use: config schema and loading, ParallelDims and the mesh, the batch of
named fields, CommGroup and the comm ledger. Imports nothing else of meshweave.

Kept free of imports here so that `meshweave.core.config` (and with it `meshweave config` / `plan`) loads
without torch.
"""
