-- Every routing config ever applied, immutable: a version is its text, named by its hash.
CREATE TABLE config_versions (
    version    INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    -- The admin key's prefix, or how a file was loaded ('startup', 'sighup').
    author     TEXT NOT NULL,
    source     TEXT NOT NULL
);
-- Each time a process switched to a version (apply, reload, rollback).
CREATE TABLE config_events (
    id       INTEGER PRIMARY KEY,
    version  INTEGER NOT NULL REFERENCES config_versions (version),
    time_ms  INTEGER NOT NULL,
    author   TEXT NOT NULL,
    action   TEXT NOT NULL
);
