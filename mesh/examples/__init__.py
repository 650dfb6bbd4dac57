"""Example Hit handlers; the README demo serves ``blobstore``."""
