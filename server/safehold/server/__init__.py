"""The safehold server: serves safehold.v1.BackupService over gRPC."""
