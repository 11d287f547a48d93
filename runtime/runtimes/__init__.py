"""The runtimes floor: isolated containers, and everything that makes and keeps them.

Images, provisioning (hardening, disks, network guards), the supervisor link and what runs over
it (commands, files), previews and relays, the warm pools and their upkeep, and the two kinds of
runtime a caller holds: sandboxes and computers. Imports only the substrate below it.
"""
