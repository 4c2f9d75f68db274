"""The runner's event loop and the callback base classes."""
