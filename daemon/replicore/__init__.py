"""replicore: replication target daemon for backup appliances, with the source side built in."""

__version__ = "0.1.0"

#: Version of the replicationcomms API this build speaks; a source refuses a target whose
#: major version differs.
API_VERSION = "1.0"
PRODUCT = "replicore"
