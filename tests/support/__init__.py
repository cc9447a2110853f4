"""Test-only helpers that run inside slmbatch processes (loaded through :mod:`slmbatch.hooks`)."""
