"""engine.malloc: with keep_freed_memory() a freed 64 MB block is reused without new page faults."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Allocate, touch and free 64 MB twice with libc's own malloc; print the minor page faults of the
# second round. glibc serves such a block with mmap and unmaps it on free unless told otherwise.
PROGRAM = """
import ctypes, resource, sys
sys.path.insert(0, sys.argv[2])
from engine.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
def round_trip():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode, str(REPO)], check=True, capture_output=True,
                         encoding="utf-8")
    return int(out.stdout.strip())


def test_keep_freed_memory_reuses_a_freed_large_block() -> None:
    pages = 64 * 2**20 // 4096
    assert _faults("default") >= pages // 2  # glibc default: mapped and zero-filled again
    assert _faults("keep") < pages // 100  # reused from the heap
