-- 0001 initial: the record, the same shape as the MySQL table (received_at is unix time).
-- One statement per ";" at the end of a line; applied by eth_twisted.sinks.sql.apply_migrations.
-- The CHECKs hold SQLite to the MySQL column widths (SQLite itself does not enforce them).
CREATE TABLE IF NOT EXISTS ethereum_data (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL UNIQUE CHECK (length(hash) = 64),
    payload BLOB NOT NULL,
    block_number INTEGER NULL CHECK (block_number IS NULL OR block_number >= 0),
    client_ip TEXT NOT NULL CHECK (length(client_ip) <= 45),
    client_id TEXT NULL CHECK (client_id IS NULL OR length(client_id) <= 255),
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_ethereum_data_block_number ON ethereum_data (block_number);
