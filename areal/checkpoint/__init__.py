"""Keeping what training makes: lazy asynchronous checkpoints, exact resume, model export."""
