"""meshweave.runtime"""
