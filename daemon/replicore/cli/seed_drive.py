"""`replicore seed-drive`: offline seeding of a target.

On the source: `create` writes a signed seed drive file of an agent's volume images,
`list --created` shows the drives made (outstanding, consumed, abandoned: the target is asked),
`abandon DRIVE_ID` gives one up. On the target: `consume DRIVE` verifies and imports a drive
into the source agent's repository, `list` shows the drives consumed here.
Refusals print one line on stderr and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ApiError
from ..protocol import DEFAULT_BLOCK_SIZE
from ..seed_drive import DriveError
from ..source import seed_drive as source_drives
from ..store import audit, seed_drives
from .common import (
    add_config_option,
    database,
    format_size,
    parse_size,
    print_json,
    print_table,
)


def _volume(text: str) -> source_drives.DriveVolume:
    volume_id, sep, path = text.partition("=")
    if not sep or not volume_id or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not DRIVER_VOLUME_ID=PATH")
    return source_drives.DriveVolume(volume_id, path)


def _block_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="source identity directory (default: $REPLICORE_SOURCE_DIR, then "
        "~/.config/replicore-source)",
    )


def register(subparsers: Any) -> None:
    top = subparsers.add_parser(
        "seed-drive",
        help="offline seeding: write a seed drive (source), consume it (target)",
        description="Carry the first, large volume images of an agent to a target on a drive "
        "instead of over the network.",
    )
    group = top.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = group.add_parser(
        "create",
        help="write a signed seed drive of an agent's volume images (source)",
        description="Read each volume image and write its records and block map to DRIVE, "
        "signed with this source's key. With a paired target (--target, or the only one), "
        "the drive's epochs become the base of the next push to it.",
    )
    p.add_argument("--agent", required=True, metavar="ID")
    p.add_argument(
        "--volume",
        required=True,
        action="append",
        type=_volume,
        dest="volumes",
        metavar="DRIVER_VOLUME_ID=PATH",
        help="a volume image and its driver volume id (repeat for several volumes)",
    )
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DRIVE")
    p.add_argument("--target", metavar="https://HOST:PORT", help="the paired target it is for")
    p.add_argument(
        "--block-size",
        type=_block_size,
        default=DEFAULT_BLOCK_SIZE,
        metavar="SIZE",
        help="block (record) size, as for push (default 64K)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _dir_option(p)
    p.set_defaults(handler=run_create)

    p = group.add_parser(
        "consume",
        help="verify and import a seed drive (target)",
        description="Check the drive's signature against the paired source's certificate, "
        "verify every record, and import its images into the agent's repository. Consuming "
        "a drive twice does nothing the second time.",
    )
    p.add_argument("drive", type=Path, metavar="DRIVE")
    p.add_argument(
        "--repository",
        metavar="NAME",
        help="approve the drive's agents that are not approved yet into this repository",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_option(p)
    p.set_defaults(handler=run_consume)

    p = group.add_parser(
        "list",
        help="the drives consumed on this target, or with --created those this source made",
    )
    p.add_argument(
        "--created",
        action="store_true",
        help="source side: the drives this source made, with their state on the target",
    )
    p.add_argument("--target", metavar="https://HOST:PORT", help="with --created: only these")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _dir_option(p)
    add_config_option(p)
    p.set_defaults(handler=run_list)

    p = group.add_parser(
        "abandon",
        help="give up a seed drive this source made (source)",
        description="The drive will not be consumed: the next push no longer builds on its "
        "epochs. Refused once the target has consumed it.",
    )
    p.add_argument("drive_id", metavar="DRIVE_ID", help="the drive's id (or a unique prefix)")
    _dir_option(p)
    p.set_defaults(handler=run_abandon)


def _refused(action: str, error: Exception) -> int:
    message = error.message if isinstance(error, ApiError) else str(error)
    print(f"replicore: seed-drive {action}: {message}", file=sys.stderr)
    return 1


def run_create(args: argparse.Namespace) -> int:
    options = source_drives.CreateOptions(
        agent_id=args.agent,
        volumes=args.volumes,
        output=args.output,
        target_url=args.target,
        directory=args.dir,
        block_size=args.block_size,
    )
    try:
        result = source_drives.create(options)
    except (source_drives.SeedDriveError, DriveError) as error:
        return _refused("create", error)
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
        return 0
    epochs = ", ".join(f"{v['driverVolumeId']}:{v['epochNumber']}" for v in result["volumes"])
    print(f"seed drive {result['driveId']} written to {result['file']}")
    print(
        f"agent {result['agentId']}: {epochs}; {result['recordCount']} records,"
        f" {format_size(result['recordsStoredBytes'])} stored"
        f" ({format_size(result['bytesRead'])} read)"
    )
    if result["targetUrl"]:
        print(f"the next push to {result['targetUrl']} builds on these epochs")
    else:
        print("not made for a paired target: pushes are not based on it")
    return 0


def run_consume(args: argparse.Namespace) -> int:
    with database(args) as conn:
        try:
            result = seed_drives.consume(conn, args.drive, args.repository)
        except (DriveError, ApiError) as error:
            return _refused("consume", DriveError(f"refused: {_message(error)}"))
        if not result.already_consumed:
            audit.command_done(
                conn, "seed_drive.consume", result.drive_id, repository=result.repository
            )
    if args.json:
        print(json.dumps(result.__dict__, separators=(",", ":")))
        return 0
    if result.already_consumed:
        print(
            f"seed drive {result.drive_id} of source {result.source_core_id} was already"
            f" consumed on {seed_drives.iso_time(result.consumed_at)}; nothing to do"
        )
        return 0
    print(
        f"consumed seed drive {result.drive_id} of source {result.source_core_id} into"
        f" repository {result.repository}"
    )
    for agent_id in result.approved_agents:
        print(f"agent {agent_id} approved into repository {result.repository}")
    for image in result.images:
        outcome = "imported" if image["outcome"] == "imported" else "already on this core"
        print(f"  agent {image['agentId']} volume image {image['volumeImage']}: {outcome}")
    print(
        f"records: {result.record_count} on the drive, {result.records_stored} new"
        f" ({format_size(result.stored_bytes)}), {result.records_present} already here"
    )
    for name in result.repaired:
        print(f"repaired: volume image {name} is no longer orphaned")
    for name in result.orphaned:
        print(f"still orphaned: volume image {name} (an epoch it builds on is missing)")
    return 0


def _message(error: Exception) -> str:
    return error.message if isinstance(error, ApiError) else str(error)


def run_list(args: argparse.Namespace) -> int:
    if args.created:
        try:
            entries = source_drives.drives(args.dir, args.target)
        except source_drives.SeedDriveError as error:
            return _refused("list", error)
        if args.json:
            print_json(entries)
            return 0
        for entry in entries:
            entry["epochs"] = ",".join(
                f"{v['driverVolumeId']}:{v['epochNumber']}" for v in entry["volumes"]
            )
            entry["target"] = entry.get("targetUrl") or "-"
            if not entry.get("checked") and entry["state"] != "consumed":
                entry["state"] += " (target not reachable)" if entry.get("targetUrl") else ""
        print_table(
            entries, ["driveId", "agentId", "epochs", "createdAt", "state", "target", "file"]
        )
        return 0
    with database(args) as conn:
        found = seed_drives.list_all(conn)
    if args.json:
        print_json(found)
        return 0
    for drive in found:
        drive["agents"] = ",".join(drive["agents"])
        drive["images"] = ", ".join(drive["volume_images"])
    print_table(
        found,
        ["drive_id", "source_core_id", "agents", "images", "consumed", "repository_name"],
    )
    return 0


def run_abandon(args: argparse.Namespace) -> int:
    try:
        entry = source_drives.abandon(args.drive_id, args.dir)
    except source_drives.SeedDriveError as error:
        return _refused("abandon", error)
    if entry["alreadyAbandoned"]:
        print(f"seed drive {entry['driveId']} was already abandoned")
        return 0
    print(f"seed drive {entry['driveId']} abandoned; the next push does not build on it")
    for warning in entry["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
