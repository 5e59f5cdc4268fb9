"""Decoding: prefill and the single-forward TiDAR step, sampling and verification, proposal choice, the
Generator with its length buckets and program cache, and draft-model speculative decoding.
"""
