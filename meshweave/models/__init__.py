"""meshweave.models"""
