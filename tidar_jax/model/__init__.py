"""The transformer: layers, the KV cache, mask-gated adapters, layer stacking, dtype rules and initialisation.
"""
