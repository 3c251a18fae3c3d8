"""The store's schema, versioned with SQLite's `PRAGMA user_version`: MIGRATIONS[i] upgrades version i to
i+1 (in one transaction with its version bump, domain/store.py `Store.migrate`), so an old store upgrades
in place with its data kept. Append; never change a migration that has shipped.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 0 → 1: the first schema.
    """
    CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );
    CREATE TABLE template_versions (
        template TEXT NOT NULL REFERENCES templates(name),
        version TEXT NOT NULL,
        source TEXT NOT NULL,
        size INTEGER NOT NULL,
        kernel TEXT NOT NULL,
        initrd TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (template, version)
    );
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        max_volumes INTEGER NOT NULL,
        max_data_gb INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE servers (
        uuid TEXT PRIMARY KEY,
        template TEXT NOT NULL,
        version TEXT NOT NULL,
        profile TEXT NOT NULL,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE server_macs (
        mac TEXT PRIMARY KEY,
        server TEXT NOT NULL REFERENCES servers(uuid) ON DELETE CASCADE
    );
    CREATE TABLE volumes (
        name TEXT PRIMARY KEY,
        server TEXT NOT NULL REFERENCES servers(uuid) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('os', 'data')),
        idx INTEGER NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL,
        serial TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (server, idx)
    );
    CREATE TABLE boot_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        server TEXT,
        data TEXT NOT NULL
    );
    CREATE INDEX boot_events_server ON boot_events(server, id);
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        owner TEXT,
        admin INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 1 → 2: server host names and addresses (for DNS), and run-time service switches.
    """
    ALTER TABLE servers ADD COLUMN hostname TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN address TEXT NOT NULL DEFAULT '';
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL
    );
    """,
    # 2 → 3: per-server CHAP. Servers made before it keep none ('') until they are rebuilt: a secret
    # set under a running node would refuse its next login (a session recovery after a target restart).
    """
    ALTER TABLE servers ADD COLUMN chap_user TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN chap_secret TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN chap_mutual_user TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN chap_mutual_secret TEXT NOT NULL DEFAULT '';
    """,
    # 3 → 4: the fleet lifecycle. A volume may be a server's restore point ('prev': the root before its
    # last upgrade, not exported) and knows what it was cloned from; OS-volume snapshots; labels and a
    # BMC per server. SQLite cannot change a CHECK, so the volumes table is made again, rows kept.
    """
    CREATE TABLE volumes_v4 (
        name TEXT PRIMARY KEY,
        server TEXT NOT NULL REFERENCES servers(uuid) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('os', 'data', 'prev')),
        idx INTEGER NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL,
        serial TEXT NOT NULL,
        created_at REAL NOT NULL,
        origin TEXT NOT NULL DEFAULT '',
        UNIQUE (server, idx)
    );
    INSERT INTO volumes_v4 (name, server, kind, idx, size, state, serial, created_at, origin)
        SELECT v.name, v.server, v.kind, v.idx, v.size, v.state, v.serial, v.created_at,
               CASE WHEN v.kind = 'os' THEN s.template || '@' || s.version ELSE '' END
        FROM volumes v JOIN servers s ON s.uuid = v.server;
    DROP TABLE volumes;
    ALTER TABLE volumes_v4 RENAME TO volumes;
    CREATE TABLE snapshots (
        server TEXT NOT NULL REFERENCES servers(uuid) ON DELETE CASCADE,
        name TEXT NOT NULL,
        volume TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (server, name)
    );
    ALTER TABLE servers ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE servers ADD COLUMN bmc_url TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN bmc_user TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN bmc_password TEXT NOT NULL DEFAULT '';
    """,
    # 4 → 5: the operator's view. PXE clients no server record knows (discovered nodes, to adopt), the
    # audit log of API writes, and a token's scope ('' = what its owner may do; 'read' = look, not touch).
    """
    CREATE TABLE discovered (
        mac TEXT PRIMARY KEY,
        uuid TEXT NOT NULL DEFAULT '',
        arch INTEGER NOT NULL DEFAULT -1,
        vendor_class TEXT NOT NULL DEFAULT '',
        user_class TEXT NOT NULL DEFAULT '',
        address TEXT NOT NULL DEFAULT '',
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        count INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        who TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE tokens ADD COLUMN scope TEXT NOT NULL DEFAULT '';
    """,
    # 5 → 6: fleets, several appliances on one store. A server's volumes live on one appliance ('' = made
    # before fleets: the first appliance that starts claims them) and a move names its target until it is
    # done; the appliances themselves; which template versions each holds a copy of; boot events kept per
    # appliance (each numbers its own: one shared sequence would have two appliances' events collide), and
    # the service switches (disabling one appliance's DHCP is not the fleet's).
    """
    ALTER TABLE servers ADD COLUMN appliance TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN moving_to TEXT NOT NULL DEFAULT '';
    CREATE TABLE appliances (
        name TEXT PRIMARY KEY,
        api_url TEXT NOT NULL,
        advertise TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        capacity_bytes INTEGER NOT NULL DEFAULT 0,
        free_bytes INTEGER NOT NULL DEFAULT 0,
        disabled INTEGER NOT NULL DEFAULT 0,
        disabled_reason TEXT NOT NULL DEFAULT '',
        answers_unknown INTEGER NOT NULL DEFAULT 0,
        version TEXT NOT NULL DEFAULT '',
        started_at REAL NOT NULL DEFAULT 0,
        heartbeat_at REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE template_copies (
        template TEXT NOT NULL,
        version TEXT NOT NULL,
        appliance TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('copying', 'ready', 'failed', 'deleting')),
        detail TEXT NOT NULL DEFAULT '',
        checksum TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL,
        PRIMARY KEY (template, version, appliance)
    );
    CREATE TABLE boot_events_v6 (
        appliance TEXT NOT NULL DEFAULT '',
        id INTEGER NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        server TEXT,
        data TEXT NOT NULL,
        PRIMARY KEY (appliance, id)
    );
    INSERT INTO boot_events_v6 (appliance, id, at, kind, server, data)
        SELECT '', id, at, kind, server, data FROM boot_events;
    DROP TABLE boot_events;
    ALTER TABLE boot_events_v6 RENAME TO boot_events;
    CREATE INDEX boot_events_server ON boot_events(server, at);
    CREATE TABLE services_v6 (
        appliance TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        PRIMARY KEY (appliance, name)
    );
    INSERT INTO services_v6 (appliance, name, enabled) SELECT '', name, enabled FROM services;
    DROP TABLE services;
    ALTER TABLE services_v6 RENAME TO services;
    """,
    # 6 → 7: the SHA-256 fingerprint of each appliance's HTTPS certificate, what the others pin ('' = none).
    """
    ALTER TABLE appliances ADD COLUMN tls_fingerprint TEXT NOT NULL DEFAULT '';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
