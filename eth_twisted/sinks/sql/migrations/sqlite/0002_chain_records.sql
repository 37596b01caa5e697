-- 0002 chain-aware records (docs/protocol.md, "Message kinds"; docs/architecture.md, "Chains").
-- One statement per ";" at the end of a line; the whole migration is one transaction.
-- Every column added is NULL or has a default, so existing rows stay as they are; their kind
-- is backfilled from what 0001 recognised (a block number: block, none: other), and their
-- canonical status stays unknown (NULL).
ALTER TABLE ethereum_data ADD COLUMN kind TEXT NULL
    CHECK (kind IS NULL OR kind IN ('block', 'reorg', 'finalized', 'other'));
ALTER TABLE ethereum_data ADD COLUMN chain_id INTEGER NULL CHECK (chain_id IS NULL OR chain_id >= 0);
ALTER TABLE ethereum_data ADD COLUMN block_hash TEXT NULL
    CHECK (block_hash IS NULL OR length(block_hash) = 66);
ALTER TABLE ethereum_data ADD COLUMN parent_hash TEXT NULL
    CHECK (parent_hash IS NULL OR length(parent_hash) = 66);
ALTER TABLE ethereum_data ADD COLUMN canonical INTEGER NULL
    CHECK (canonical IS NULL OR canonical IN (0, 1));
ALTER TABLE ethereum_data ADD COLUMN finalized INTEGER NOT NULL DEFAULT 0 CHECK (finalized IN (0, 1));
UPDATE ethereum_data SET kind = CASE WHEN block_number IS NULL THEN 'other' ELSE 'block' END
    WHERE kind IS NULL;
-- At most one canonical block per (chain_id, block_number).
CREATE UNIQUE INDEX IF NOT EXISTS uq_ethereum_data_canonical
    ON ethereum_data (chain_id, block_number) WHERE canonical = 1;
CREATE INDEX IF NOT EXISTS ix_ethereum_data_chain_hash ON ethereum_data (chain_id, block_hash);
CREATE INDEX IF NOT EXISTS ix_ethereum_data_chain_number ON ethereum_data (chain_id, block_number);
-- One row per chain seen: its finality and its reorg counts (what /api/chains reads).
CREATE TABLE IF NOT EXISTS chains (
    chain_id INTEGER NOT NULL PRIMARY KEY CHECK (chain_id >= 0),
    first_seen_at REAL NOT NULL,
    finalized_number INTEGER NULL,
    finalized_hash TEXT NULL,
    safe_number INTEGER NULL,
    safe_hash TEXT NULL,
    reorgs INTEGER NOT NULL DEFAULT 0,
    violations INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reorgs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_id INTEGER NOT NULL,
    fork_number INTEGER NOT NULL,
    depth INTEGER NOT NULL,
    replaced INTEGER NOT NULL,
    old_head TEXT NULL,
    new_head TEXT NULL,
    detected_at INTEGER NOT NULL,
    received_at REAL NOT NULL,
    client_ip TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE CHECK (length(hash) = 64),
    below_finality INTEGER NOT NULL DEFAULT 0 CHECK (below_finality IN (0, 1)),
    finalized_number INTEGER NULL
);
CREATE INDEX IF NOT EXISTS ix_reorgs_chain ON reorgs (chain_id, id);
-- Every hash a reorg record named (at most 1,024 per list), so a block arriving after the
-- record that names it takes the status the latest such record gave it.
CREATE TABLE IF NOT EXISTS reorg_blocks (
    chain_id INTEGER NOT NULL,
    block_hash TEXT NOT NULL,
    reorg_id INTEGER NOT NULL,
    canonical INTEGER NOT NULL CHECK (canonical IN (0, 1)),
    PRIMARY KEY (chain_id, block_hash, reorg_id)
);
CREATE TABLE IF NOT EXISTS finality (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_id INTEGER NOT NULL,
    block_number INTEGER NOT NULL,
    block_hash TEXT NOT NULL,
    safe_number INTEGER NULL,
    safe_hash TEXT NULL,
    received_at REAL NOT NULL,
    client_ip TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE CHECK (length(hash) = 64),
    violation INTEGER NOT NULL DEFAULT 0 CHECK (violation IN (0, 1))
);
CREATE INDEX IF NOT EXISTS ix_finality_chain_number ON finality (chain_id, block_number);
