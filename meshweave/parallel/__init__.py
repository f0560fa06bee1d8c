"""meshweave.parallel"""
