"""The ground floor: what everything above stands on, and nothing of it knows of runtimes.

Errors (one tree), settings, result models, the store (SQLite, one transaction per call), the
Docker backend (the only module that speaks to Docker), the audit log and its anchors, tokens
and scopes, and run trees. Imports nothing of dockyard above it.
"""
