"""Repositories of backups, shared by the client and (later) the server's scheduler.

A repository is a directory or `s3://bucket/prefix`: see repository.py for the layout,
store.py for the interface behind it, policy.py for retention.
"""

from safehold.repository.location import is_remote, open_repository, split_backup
from safehold.repository.manifest import Manifest
from safehold.repository.policy import Decision, Policy, plan
from safehold.repository.repository import Artefact, PrunePlan, Repository

__all__ = [
    "Artefact",
    "Decision",
    "Manifest",
    "Policy",
    "PrunePlan",
    "Repository",
    "is_remote",
    "open_repository",
    "plan",
    "split_backup",
]
