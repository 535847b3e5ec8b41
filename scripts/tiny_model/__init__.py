"""Making the embedded tiny model (server/assets/tiny): tools beside the product, not served.

    python -m scripts.tiny_model.build [--out DIR] [--seed 0]   # random-weight starting point + tokenizer
    python -m scripts.tiny_model.train [--threads 1] [--out DIR]  # the shipped trained weights

Modules: shape (the model's architecture, read from the shipped config.json: the one
definition), train (training on the standard library's source), build (the byte-level
tokenizer and the untrained folder). The corpus reader they train on is server/eval/corpus.py,
which the evaluation also reads its held-out windows from, so the served package never
imports from here.
"""
