"""The ``sdbackup`` command: backup, snapshots, ls, restore, status."""
