-- Knowledge for retrieval: documents an org uploaded, cut into chunks. agent_id NULL means
-- org-wide (visible to every agent of the org). One document per (org, scope, source name):
-- re-ingesting a source replaces its chunks.
CREATE TABLE knowledge_documents (
    document_id   text        PRIMARY KEY,
    org_id        text        NOT NULL REFERENCES orgs,
    agent_id      text        REFERENCES agents,
    source        text        NOT NULL,
    content_type  text        NOT NULL,
    sha256        text        NOT NULL,
    chars         integer     NOT NULL,
    chunk_count   integer     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- coalesce: NULL (org-wide) must collide with NULL, which a plain UNIQUE would not do.
CREATE UNIQUE INDEX knowledge_documents_by_scope_source
    ON knowledge_documents (org_id, (coalesce(agent_id, '')), source);

CREATE TABLE knowledge_chunks (
    chunk_id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id   text        NOT NULL REFERENCES knowledge_documents ON DELETE CASCADE,
    org_id        text        NOT NULL,  -- copied from the document: retrieval filters on it
    agent_id      text,
    source        text        NOT NULL,
    ordinal       integer     NOT NULL,
    text          text        NOT NULL,
    tsv           tsvector    GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
    embedding_model text,
    UNIQUE (document_id, ordinal)
);
CREATE INDEX knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv);
CREATE INDEX knowledge_chunks_by_scope ON knowledge_chunks (org_id, agent_id);

-- pgvector is optional: where the extension is installable, chunks get an ``embedding`` column
-- (any dimension; the embedding_model column keeps vector spaces apart). Elsewhere retrieval is
-- full-text only, and the migration still applies.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS vector;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pgvector available but not installable here: full-text search only';
            RETURN;
        END;
        ALTER TABLE knowledge_chunks ADD COLUMN embedding vector;
    END IF;
END $$;
