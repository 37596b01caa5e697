-- 0002 chain-aware records (docs/protocol.md, "Message kinds"; docs/architecture.md, "Chains").
-- One statement per ";" at the end of a line. Online on a live table: the new tables first,
-- then the plain columns (NULL or with a default: an instant ALTER on MariaDB 10.3+ and
-- MySQL 8), the generated column alone (VIRTUAL, also instant; a STORED one would copy the
-- table under a write lock), then the indexes (built in place without blocking writes), then
-- the backfill of kind for existing rows. A statement already applied before an interruption
-- (duplicate column or key) is skipped when the migration runs again.
CREATE TABLE IF NOT EXISTS chains (
    chain_id BIGINT UNSIGNED NOT NULL,
    first_seen_at DATETIME(6) NOT NULL,
    finalized_number BIGINT UNSIGNED NULL,
    finalized_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    safe_number BIGINT UNSIGNED NULL,
    safe_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    reorgs BIGINT UNSIGNED NOT NULL DEFAULT 0,
    violations BIGINT UNSIGNED NOT NULL DEFAULT 0,
    PRIMARY KEY (chain_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS reorgs (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    chain_id BIGINT UNSIGNED NOT NULL,
    fork_number BIGINT UNSIGNED NOT NULL,
    depth BIGINT UNSIGNED NOT NULL,
    replaced BIGINT UNSIGNED NOT NULL,
    old_head CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    new_head CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    detected_at BIGINT UNSIGNED NOT NULL,
    received_at DATETIME(6) NOT NULL,
    client_ip VARCHAR(45) NOT NULL,
    hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    below_finality TINYINT NOT NULL DEFAULT 0,
    finalized_number BIGINT UNSIGNED NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_reorgs_hash (hash),
    KEY ix_reorgs_chain (chain_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS reorg_blocks (
    chain_id BIGINT UNSIGNED NOT NULL,
    block_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    reorg_id BIGINT UNSIGNED NOT NULL,
    canonical TINYINT NOT NULL,
    PRIMARY KEY (chain_id, block_hash, reorg_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS finality (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    chain_id BIGINT UNSIGNED NOT NULL,
    block_number BIGINT UNSIGNED NOT NULL,
    block_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    safe_number BIGINT UNSIGNED NULL,
    safe_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    received_at DATETIME(6) NOT NULL,
    client_ip VARCHAR(45) NOT NULL,
    hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    violation TINYINT NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    UNIQUE KEY uq_finality_hash (hash),
    KEY ix_finality_chain_number (chain_id, block_number)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
ALTER TABLE ethereum_data
    ADD COLUMN kind VARCHAR(9) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN chain_id BIGINT UNSIGNED NULL,
    ADD COLUMN block_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN parent_hash CHAR(66) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN canonical TINYINT NULL,
    ADD COLUMN finalized TINYINT NOT NULL DEFAULT 0;
-- NULL unless canonical: under the unique key below, at most one canonical block per height.
ALTER TABLE ethereum_data
    ADD COLUMN canonical_number BIGINT UNSIGNED AS (IF(canonical = 1, block_number, NULL)) VIRTUAL;
ALTER TABLE ethereum_data
    ADD UNIQUE KEY uq_ethereum_data_canonical (chain_id, canonical_number),
    ADD KEY ix_ethereum_data_chain_hash (chain_id, block_hash),
    ADD KEY ix_ethereum_data_chain_number (chain_id, block_number);
UPDATE ethereum_data SET kind = IF(block_number IS NULL, 'other', 'block') WHERE kind IS NULL;
