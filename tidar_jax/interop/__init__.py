"""Interop: Hugging Face (safetensors, config.json) import and export, and GGUF import.
"""
