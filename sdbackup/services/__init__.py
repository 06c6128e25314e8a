"""Long-lived services: the manager, the storage server and their parts."""
