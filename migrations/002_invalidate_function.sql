-- wal2cache.invalidate(keys, tags): invalidate cache keys and tags from inside a
-- transaction. It writes a transactional logical message that wal2cache turns into a
-- plan when, and only if, the transaction commits. Idempotent.
CREATE SCHEMA IF NOT EXISTS wal2cache;

CREATE OR REPLACE FUNCTION wal2cache.invalidate(keys text[] DEFAULT '{}', tags text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_logical_emit_message(
        true,
        'wal2cache',
        json_build_object(
            'keys', coalesce(keys, '{}'::text[]),
            'tags', coalesce(tags, '{}'::text[])
        )::text
    );
END;
$$;

COMMENT ON FUNCTION wal2cache.invalidate(text[], text[]) IS
    'Invalidates cache keys and tags through wal2cache when the calling transaction commits.';
