"""Helpers every layer of vitops needs (atomic writes, hashing, timestamps), free of heavy imports."""
