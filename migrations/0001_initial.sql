-- Version 1: one row per cached token, sealed with AES-256-GCM.
-- k: keyed SHA-256 digest of (kind, scope key, user JWT hash); never plaintext.
CREATE TABLE tokens (
    k          BLOB PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('system', 'user')),
    kid        TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ct         BLOB NOT NULL,
    expires_at REAL NOT NULL,
    last_used  REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX tokens_lru ON tokens (kind, last_used);
CREATE INDEX tokens_expiry ON tokens (expires_at);

-- Small shared state: 'generation' is bumped by every clear() so that a fetch
-- that began before the clear does not write its token back after it.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('generation', 0);

-- A failed fetch makes every process fail fast for that key until 'until'.
CREATE TABLE backoff (
    k      BLOB PRIMARY KEY,
    until  REAL NOT NULL,
    cause  TEXT NOT NULL,
    status INTEGER
);
