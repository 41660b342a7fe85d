-- The small schema the demo and the example rules use. Idempotent.
CREATE TABLE IF NOT EXISTS public.categories (
    id    int PRIMARY KEY,
    name  text NOT NULL
);

CREATE TABLE IF NOT EXISTS public.products (
    id           int PRIMARY KEY,
    slug         text NOT NULL UNIQUE,
    category_id  int REFERENCES public.categories (id),
    name         text NOT NULL,
    price        numeric(10, 2) NOT NULL,
    description  text
);
-- Keys use the slug, which is not the primary key: the old slug must be in the WAL.
ALTER TABLE public.products REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS public.tenant_settings (
    tenant_id  int PRIMARY KEY,
    settings   jsonb NOT NULL DEFAULT '{}'
);
