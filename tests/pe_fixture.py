"""A generator of minimal valid PE32 DLLs carrying a VS_VERSIONINFO resource, for the
Exchange DLL tests.

The layout follows Microsoft's PE/COFF specification and the VS_VERSIONINFO, StringFileInfo
and VarFileInfo structures of the Win32 resource documentation: a DOS header pointing at the
PE header, a COFF header (i386, DLL), a PE32 optional header with 16 data directories of
which only the resource directory is set, and one `.rsrc` section holding a three-level
resource directory (RT_VERSION / id 1 / language 0x409) whose data entry is the
VS_VERSIONINFO block. There is no code: the file is a resource-only DLL, which Windows
itself loads with LOAD_LIBRARY_AS_DATAFILE. Nothing here is copied from a real binary.
"""

from __future__ import annotations

import struct

FILE_ALIGNMENT = 0x200
SECTION_ALIGNMENT = 0x1000
RSRC_RVA = 0x1000
RT_VERSION = 16
LANG_EN_US = 0x0409
CODEPAGE_UNICODE = 0x04B0


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (_align(len(data), 4) - len(data))


def _utf16z(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def _block(key: str, value: bytes, value_length: int, text: bool, children: list[bytes]) -> bytes:
    """One version-resource block: wLength, wValueLength, wType, szKey, padding, Value,
    padding, children (each 32-bit aligned). wLength excludes the block's own trailing
    padding, as resource compilers write it."""
    head = struct.pack("<HHH", 0, value_length, 1 if text else 0) + _utf16z(key)
    body = _pad4(head) + value
    for child in children:
        body = _pad4(body) + child
    return struct.pack("<H", len(body)) + body[2:]


def _version_numbers(version: str) -> tuple[int, int]:
    parts = [int(p) for p in version.split(".")]
    parts += [0] * (4 - len(parts))
    if len(parts) != 4 or any(not 0 <= p <= 0xFFFF for p in parts):
        raise ValueError(f"{version!r} is not a.b.c.d with parts 0..65535")
    return (parts[0] << 16) | parts[1], (parts[2] << 16) | parts[3]


def version_info(
    file_version: str, product_version: str | None = None, strings: dict[str, str] | None = None
) -> bytes:
    """The VS_VERSIONINFO block for the given versions and StringFileInfo strings."""
    product_version = product_version or file_version
    file_ms, file_ls = _version_numbers(file_version)
    product_ms, product_ls = _version_numbers(product_version)
    fixed = struct.pack(
        "<13I",
        0xFEEF04BD,  # dwSignature
        0x00010000,  # dwStrucVersion
        file_ms,
        file_ls,
        product_ms,
        product_ls,
        0x3F,  # dwFileFlagsMask
        0,  # dwFileFlags
        0x00040004,  # dwFileOS: VOS_NT_WINDOWS32
        2,  # dwFileType: VFT_DLL
        0,  # dwFileSubtype
        0,  # dwFileDateMS
        0,  # dwFileDateLS
    )
    table = {
        "CompanyName": "Microsoft Corporation",
        "FileDescription": "Extensible Storage Engine for Microsoft(R) Exchange Server",
        "FileVersion": file_version,
        "ProductName": "Microsoft(R) Exchange",
        "ProductVersion": product_version,
        **(strings or {}),
    }
    string_blocks = [
        _block(name, _utf16z(value), len(value) + 1, True, []) for name, value in table.items()
    ]
    string_table = _block(f"{LANG_EN_US:04X}{CODEPAGE_UNICODE:04X}", b"", 0, True, string_blocks)
    string_file_info = _block("StringFileInfo", b"", 0, True, [string_table])
    translation = _block(
        "Translation", struct.pack("<HH", LANG_EN_US, CODEPAGE_UNICODE), 4, False, []
    )
    var_file_info = _block("VarFileInfo", b"", 0, True, [translation])
    return _block("VS_VERSION_INFO", fixed, len(fixed), False, [string_file_info, var_file_info])


def _resource_section(payload: bytes) -> bytes:
    """RT_VERSION -> id 1 -> language 0x409 -> data entry -> payload, offsets from the start
    of the section (directories) and as RVAs (the data entry)."""

    def directory(entry_id: int, target: int) -> bytes:
        header = struct.pack("<IIHHHH", 0, 0, 0, 0, 0, 1)
        return header + struct.pack("<II", entry_id, target)

    data_offset = 3 * 24 + 16
    section = (
        directory(RT_VERSION, 0x80000000 | 24)
        + directory(1, 0x80000000 | 48)
        + directory(LANG_EN_US, 72)
        + struct.pack("<IIII", RSRC_RVA + data_offset, len(payload), 0, 0)
    )
    assert len(section) == data_offset
    return section + payload


def make_dll(
    file_version: str = "15.2.1118.7",
    product_version: str | None = None,
    strings: dict[str, str] | None = None,
    *,
    with_version: bool = True,
) -> bytes:
    """A resource-only PE32 DLL; with_version=False leaves its resource section empty of a
    version resource (a valid PE that has no version to read)."""
    if with_version:
        rsrc = _resource_section(version_info(file_version, product_version, strings))
    else:
        rsrc = struct.pack("<IIHHHH", 0, 0, 0, 0, 0, 0)
    raw_size = _align(len(rsrc), FILE_ALIGNMENT)
    headers_size = FILE_ALIGNMENT
    image_size = RSRC_RVA + _align(len(rsrc), SECTION_ALIGNMENT)

    dos = bytearray(64)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 64)
    coff = struct.pack(
        "<HHIIIHH",
        0x014C,  # Machine: i386
        1,  # NumberOfSections
        0,  # TimeDateStamp
        0,  # PointerToSymbolTable
        0,  # NumberOfSymbols
        224,  # SizeOfOptionalHeader (PE32)
        0x2102,  # EXECUTABLE_IMAGE | 32BIT_MACHINE | DLL
    )
    directories = [(0, 0)] * 16
    directories[2] = (RSRC_RVA, len(rsrc))  # IMAGE_DIRECTORY_ENTRY_RESOURCE
    optional = struct.pack(
        "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII",
        0x010B,  # Magic: PE32
        14,  # MajorLinkerVersion
        0,  # MinorLinkerVersion
        0,  # SizeOfCode
        raw_size,  # SizeOfInitializedData
        0,  # SizeOfUninitializedData
        0,  # AddressOfEntryPoint (none: resource-only)
        0,  # BaseOfCode
        RSRC_RVA,  # BaseOfData
        0x10000000,  # ImageBase
        SECTION_ALIGNMENT,
        FILE_ALIGNMENT,
        6,  # MajorOperatingSystemVersion
        0,
        0,  # MajorImageVersion
        0,
        6,  # MajorSubsystemVersion
        0,
        0,  # Win32VersionValue
        image_size,  # SizeOfImage
        headers_size,  # SizeOfHeaders
        0,  # CheckSum
        2,  # Subsystem: Windows GUI
        0x0140,  # DllCharacteristics: DYNAMIC_BASE | NX_COMPAT
        0x100000,  # SizeOfStackReserve
        0x1000,  # SizeOfStackCommit
        0x100000,  # SizeOfHeapReserve
        0x1000,  # SizeOfHeapCommit
        0,  # LoaderFlags
        16,  # NumberOfRvaAndSizes
    ) + b"".join(struct.pack("<II", rva, size) for rva, size in directories)
    assert len(optional) == 224
    section = struct.pack(
        "<8sIIIIIIHHI",
        b".rsrc",
        len(rsrc),  # VirtualSize
        RSRC_RVA,  # VirtualAddress
        raw_size,  # SizeOfRawData
        headers_size,  # PointerToRawData
        0,
        0,
        0,
        0,
        0x40000040,  # INITIALIZED_DATA | MEM_READ
    )
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    headers += b"\0" * (headers_size - len(headers))
    return headers + rsrc + b"\0" * (raw_size - len(rsrc))
