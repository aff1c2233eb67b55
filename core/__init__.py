"""The ground floor: command-line and settings machinery, files, distributed helpers, seeded sampling.

Every other package may import from here; nothing here imports another package of the suite.
"""
