"""Pretraining data: files to token shards (prepare.py), packed batches and their exact resume
(loader.py), the built-in generated corpus (corpus.py).

May import seekforge.errors, configio, documents (the file readers), tokenizer and tasks (the built-in
corpus's problems); never the model, engine or trainers."""
