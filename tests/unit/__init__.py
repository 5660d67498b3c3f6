"""In-process tests of the core, engine, pricing, providers, parsers and storage."""
