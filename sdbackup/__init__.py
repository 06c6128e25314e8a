"""sdbackup: a distributed backup cluster on Twisted.

A manager places chunks and keeps the catalog, storage servers hold verified
chunk files and replicate them, and the ``sdbackup`` client backs up and
restores files with end-to-end checksums.
"""

__version__ = "0.1.0"
