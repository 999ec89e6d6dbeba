"""Pretraining data: files to token shards (prepare), packed batches (loader), the built-in corpus (corpus)."""
