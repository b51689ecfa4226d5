"""Generated from protos/safehold/v1."""
