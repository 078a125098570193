"""The FUSE protocol's structures and constants against the kernel's own definitions.

The installed `linux/fuse.h` (Debian 12's kernel headers: protocol 7.38) is compiled
into a program that prints every structure's size and every field's offset, and every
opcode and flag; dorafs/fuse/protocol.py must agree. What 7.39 to 7.45 added (the
passthrough fields, the new flags and opcodes) is checked against the values in the
kernel's include/uapi/linux/fuse.h at 7.45, written out below.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dorafs.fuse import protocol as p

HEADER = "/usr/include/linux/fuse.h"

# Fields the 7.38 header has under another name or not at all (7.40: backing_id, the
# former padding; max_stack_depth and, 7.43, request_timeout, the former unused words).
NEWER_FIELDS = {("fuse_open_out", "backing_id"): 12, ("fuse_init_out", "max_stack_depth"): 36,
                ("fuse_init_out", "request_timeout"): 40}
NEWER_STRUCTS = {"fuse_backing_map": (16, {"fd": 0, "flags": 4})}  # 7.40
NEWER_CONSTANTS = {  # kernel 7.45 values of what the installed header lacks
    "FUSE_INIT_RESERVED": 1 << 31,  # (1 << 31) before 7.40: a negative int in C
    "FUSE_CREATE_SUPP_GROUP": 1 << 34, "FUSE_HAS_EXPIRE_ONLY": 1 << 35,
    "FUSE_DIRECT_IO_ALLOW_MMAP": 1 << 36, "FUSE_PASSTHROUGH": 1 << 37, "FUSE_NO_EXPORT_SUPPORT": 1 << 38,
    "FUSE_HAS_RESEND": 1 << 39, "FUSE_ALLOW_IDMAP": 1 << 40, "FUSE_OVER_IO_URING": 1 << 41,
    "FUSE_REQUEST_TIMEOUT": 1 << 42, "FOPEN_PASSTHROUGH": 1 << 7, "FUSE_STATX": 52,
    "FUSE_COPY_FILE_RANGE_64": 53, "FUSE_NOTIFY_RESEND": 7, "FUSE_NOTIFY_INC_EPOCH": 8,
}


def _constants() -> dict[str, int]:
    """dorafs's constants under the kernel's names."""
    ours = {f"FUSE_{name}": value for value, name in p.OPCODE_NAMES.items()}
    ours |= {f"FUSE_{name}": value for value, name in p.INIT_FLAG_NAMES.items()}
    ours |= {name: getattr(p, name) for name in dir(p) if name.startswith(("FOPEN_", "FATTR_"))}
    ours |= {f"FUSE_{name}": getattr(p, name) for name in dir(p)
             if name.startswith("NOTIFY_") and isinstance(getattr(p, name), int)}
    return ours


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """{'sizeof struct': n, 'struct.field': offset, 'CONSTANT': value} from the C header."""
    if not shutil.which("gcc"):
        pytest.skip("no C compiler")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>", f"#include <{HEADER}>",
             "int main(void) {"]
    for layout in p.LAYOUTS:
        if layout.name in NEWER_STRUCTS:
            continue
        lines.append(f'printf("sizeof {layout.name} %zu\\n", sizeof(struct {layout.name}));')
        for field in layout.names():
            if (layout.name, field) in NEWER_FIELDS:
                continue
            lines.append(f'printf("{layout.name}.{field} %zu\\n", offsetof(struct {layout.name}, {field}));')
    for name in _constants():
        if name not in NEWER_CONSTANTS:
            lines.append(f'printf("{name} %llu\\n", (unsigned long long){name});')
    lines += ['printf("FUSE_ROOT_ID %d\\n", FUSE_ROOT_ID);', "return 0; }"]
    tmp = tmp_path_factory.mktemp("fuseh")
    (tmp / "layout.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp / "layout"), str(tmp / "layout.c")], check=True)
    out = subprocess.run([str(tmp / "layout")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.mark.parametrize("layout", p.LAYOUTS, ids=lambda l: l.name)
def test_structure_sizes_and_offsets_match_the_kernel(kernel, layout):
    if layout.name in NEWER_STRUCTS:
        size, offsets = NEWER_STRUCTS[layout.name]
        assert layout.size == size
        assert {f: layout.offset(f) for f in offsets} == offsets
        return
    assert layout.size == kernel[f"sizeof {layout.name}"]
    for field in layout.names():
        expected = NEWER_FIELDS.get((layout.name, field))
        if expected is None:
            expected = kernel[f"{layout.name}.{field}"]
        assert layout.offset(field) == expected, f"{layout.name}.{field}"


def test_opcodes_and_flags_match_the_kernel(kernel):
    for name, value in _constants().items():
        assert value == NEWER_CONSTANTS.get(name, kernel.get(name)), name
    assert kernel["FUSE_ROOT_ID"] == p.ROOT_ID


def test_dirent_padding():
    assert p.dirent_size(1, plus=False) == 32  # 24 + 1, to 8
    assert p.dirent_size(8, plus=False) == 32
    assert p.dirent_size(9, plus=False) == 40
    assert p.dirent_size(1, plus=True) == 160  # 152 + 1, to 8


def test_device_ioctl_numbers():
    # _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
    assert p.DEV_IOC_CLONE == 0x8004E500
    assert p.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert p.DEV_IOC_BACKING_CLOSE == 0x4004E502
