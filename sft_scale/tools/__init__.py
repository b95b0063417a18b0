"""After training: merge an adapter into its base (merge.py), export a checkpoint as a clean
adapter or model (export.py) or as GGUF for llama.cpp (gguf_export.py, gguf_convert.py), and
generation evaluation before/after (generation_eval.py)."""
