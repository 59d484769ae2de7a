"""QEMU backend pieces (see docs/migration.md for the migration-stream reader)."""
