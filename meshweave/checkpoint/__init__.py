"""meshweave.checkpoint"""
