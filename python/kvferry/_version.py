# The package's version; equal to the Rust workspace's (checked by the tests).
__version__ = "0.1.0"
