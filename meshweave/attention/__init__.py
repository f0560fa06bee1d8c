"""meshweave.attention"""
