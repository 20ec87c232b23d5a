-- Version 3: a check value per key id, so that a process whose key does not match the
-- rows present can say so (instead of silently missing every lookup: digests are keyed).
-- check_value: HMAC-SHA-256 of a fixed label under a key derived from the key; it reveals
-- nothing about the key.
CREATE TABLE key_checks (
    kid         TEXT PRIMARY KEY,
    check_value BLOB NOT NULL
);
