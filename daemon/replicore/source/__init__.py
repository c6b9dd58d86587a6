"""The source side (`replicore source ...`, `replicore push`): identity, pinned connection to a
target, and the push client."""
