"""Data: the embedded corpora, tokenizers, chat templates and prompt sets, and the Grain input pipeline.
"""
