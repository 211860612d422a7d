CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    kernel_path TEXT NOT NULL,
    rootfs_path TEXT NOT NULL,
    boot_args TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images(id),
    user_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    vcpu_count INTEGER NOT NULL,
    mem_mib INTEGER NOT NULL,
    boot_args TEXT NOT NULL DEFAULT '',
    user_data TEXT NOT NULL DEFAULT '',
    enable_network INTEGER NOT NULL DEFAULT 1,
    boot_count INTEGER NOT NULL DEFAULT 0,
    restore_count INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_user ON vms(user_id, created_at);

CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    state_key TEXT NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_vm ON snapshots(vm_id, created_at);

CREATE TABLE IF NOT EXISTS proxy_routes (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    subdomain TEXT NOT NULL UNIQUE,
    target_port INTEGER NOT NULL,
    auto_wake INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS routes_vm ON proxy_routes(vm_id, created_at);

CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
