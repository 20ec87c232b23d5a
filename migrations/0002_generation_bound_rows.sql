-- Version 2: rows carry the clear() generation they were written in, and it is
-- bound into their seal, so a row saved before a clear() never opens after it.
-- The sealed envelope changed format too: rows of version 1 are dropped (each key
-- is fetched once more).
DELETE FROM tokens;
ALTER TABLE tokens ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;
-- Our mark in the file header ('AGWC'): tells our files from other SQLite files.
PRAGMA application_id = 1095194435;
