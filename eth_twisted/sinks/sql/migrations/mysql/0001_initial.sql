-- 0001 initial: the record, as the README's "Storage" section describes it.
-- One statement per ";" at the end of a line; applied by eth_twisted.sinks.sql.apply_migrations.
-- The CHECK makes a malformed hash a data error the sink isolates (REJECTED), never a silent truncation.
CREATE TABLE IF NOT EXISTS ethereum_data (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    payload MEDIUMBLOB NOT NULL,
    block_number BIGINT UNSIGNED NULL,
    client_ip VARCHAR(45) NOT NULL,
    client_id VARCHAR(255) NULL,
    received_at DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_ethereum_data_hash (hash),
    KEY ix_ethereum_data_block_number (block_number),
    CONSTRAINT ck_ethereum_data_hash CHECK (CHAR_LENGTH(hash) = 64)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
