"""The domain: what Cello knows and does, free of HTTP, sockets and the composition root.

The state store and its rows, the event bus, the server workflows (create, delete, data volumes,
reconcile), users and quotas, services, template versions and build jobs, the boot policy the DHCP and
TFTP services ask. It imports `iscsi` (volumes, exports), `bootfiles.spec` (the boot contract) and
`naming`; never `web` or `appliance` (the import-linter contract in pyproject.toml says so).
"""
