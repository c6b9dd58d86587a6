"""`replicore push`: replicate volume images of one agent to a paired target (source side).

Parses the command line into `source.push.PushOptions`, runs the push, prints the result: a
summary on stdout, or with `--json` one JSON line with the figures.  Failures print one line
on stderr and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..protocol import DEFAULT_BLOCK_SIZE, ProtocolError, check_block_size
from ..source.hashpass import HashPass
from ..source.reader import Image, ImageError
from .common import CommandError, format_size, parse_size


def _volume(text: str) -> tuple[str, str]:
    volume_id, sep, path = text.partition("=")
    if not sep or not volume_id or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not DRIVER_VOLUME_ID=PATH")
    return volume_id, path


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "push",
        help="replicate volume images of an agent to a paired target",
        description="Read each volume image (file or block device), send the blocks the "
        "target lacks, and commit them as one recovery point with the next epoch of each "
        "volume. Run again after an interruption, it resumes.",
    )
    p.add_argument(
        "--target", metavar="https://HOST:PORT", help="the paired target (default: the only one)"
    )
    p.add_argument("--agent", required=True, metavar="ID", help="the agent the images belong to")
    p.add_argument(
        "--volume",
        required=True,
        action="append",
        type=_volume,
        metavar="DRIVER_VOLUME_ID=PATH",
        dest="volumes",
        help="a volume image and its driver volume id (repeat for several volumes)",
    )
    p.add_argument(
        "--streams", type=int, default=4, metavar="N", help="parallel connections (default 4)"
    )
    p.add_argument(
        "--block-size",
        type=_positive_size,
        default=DEFAULT_BLOCK_SIZE,
        metavar="SIZE",
        help="block (record) size, a power of two from 4K to 1M (default 64K)",
    )
    p.add_argument(
        "--max-rate",
        type=_positive_size,
        metavar="BYTES_PER_S",
        help="cap on the bytes sent per second (e.g. 50M)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    p.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="source identity directory (default: $REPLICORE_SOURCE_DIR, then "
        "~/.config/replicore-source)",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="direct (O3E) transfer: send the bitmap of used blocks, then those blocks, "
        "without hashing or key negotiation (the target hashes)",
    )
    p.set_defaults(handler=run)


def _first_pass(args: argparse.Namespace) -> HashPass | None:
    """The first volume's hash pass, started now: the image is read while the push loads its
    TLS stack and connects. None where the push itself will report what is wrong."""
    if args.direct:
        return None
    try:
        check_block_size(args.block_size)
        return HashPass.started(Image(args.volumes[0][1], args.block_size))
    except (ProtocolError, ImageError):
        return None


def run(args: argparse.Namespace) -> int:
    first_pass = _first_pass(args)
    from ..source.push import OptionError, PushError, PushOptions, VolumeSpec, push

    options = PushOptions(
        agent_id=args.agent,
        volumes=[VolumeSpec(volume_id, path) for volume_id, path in args.volumes],
        target_url=args.target,
        streams=args.streams,
        block_size=args.block_size,
        max_rate=args.max_rate,
        directory=args.dir,
        progress=sys.stderr,
        first_pass=first_pass,
    )
    try:
        if args.direct:
            from ..source.direct import push_direct

            result = push_direct(options)
        else:
            result = push(options)
    except OptionError as error:
        raise CommandError(str(error)) from None
    except PushError as error:
        print(f"replicore: push: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
        return 0
    for volume in result["volumes"]:
        if volume["already_committed"]:
            print(f"volume {volume['driver_volume_id']}: epoch {volume['epoch']} was committed")
            continue
        print(
            f"volume {volume['driver_volume_id']}: epoch {volume['epoch']} committed, "
            f"read {format_size(volume['bytes_read'])}, sent {volume['records_sent']} records "
            f"({format_size(volume['bytes_sent'])} compressed), "
            f"deduplicated {format_size(volume['dedup_bytes'])}"
        )
    print(
        f"recovery point {result['recovery_point_id']}: {len(result['volumes'])} volume(s) in "
        f"{result['seconds']:.2f} s, {format_size(result['wire_bytes'])} on the wire"
    )
    return 0
