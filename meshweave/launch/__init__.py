"""meshweave.launch"""
