"""Python modules that the bundle's configs instantiate as ``scripts.<module>.<Class>``."""
