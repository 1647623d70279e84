"""r1box runtime: loads an exported artifact through its manifest and serves it."""
