#!/usr/bin/env python3
"""Single system calls in a loop on a directory of any mounted file system: µs per call.

Usage: python3 bench/calls.py DIR   (DIR is created; its files are removed at the end).
Run it on vaultfs, gocryptfs and a plain directory, alternating; see docs/PERFORMANCE.md."""
import os, sys, time
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
def timeit(name, n, f):
    t = time.perf_counter()
    for i in range(n): f(i)
    dt = (time.perf_counter() - t) / n * 1e6
    print("%-22s %8.1f us" % (name, dt))
# setup: 500 small files
for i in range(500):
    with open(f"{d}/s{i}", "wb") as fh: fh.write(b"x" * 3000)
timeit("stat(cached)", 5000, lambda i: os.stat(f"{d}/s{i%500}"))
def rd(i):
    with open(f"{d}/s{i%500}", "rb") as fh: fh.read()
timeit("open+read+close", 3000, rd)
timeit("chmod", 3000, lambda i: os.chmod(f"{d}/s{i%500}", 0o600 | (i & 1) * 0o44))
timeit("rename x2", 3000, lambda i: (os.rename(f"{d}/s{i%500}", f"{d}/t{i%500}"), os.rename(f"{d}/t{i%500}", f"{d}/s{i%500}")))
fd = os.open(f"{d}/log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
timeit("append 100B", 20000, lambda i: os.write(fd, b"y" * 100))
timeit("append+fdatasync", 300, lambda i: (os.write(fd, b"z" * 100), os.fdatasync(fd)))
os.close(fd)
timeit("mkdir+rmdir", 1000, lambda i: (os.mkdir(f"{d}/dd{i}"), os.rmdir(f"{d}/dd{i}")))
timeit("listdir(500)", 200, lambda i: os.listdir(d))
timeit("setxattr+getxattr", 2000, lambda i: (os.setxattr(f"{d}/s{i%500}", "user.k", b"v%d" % i), os.getxattr(f"{d}/s{i%500}", "user.k")))
timeit("symlink+readlink+unl", 1000, lambda i: (os.symlink("target%d" % i, f"{d}/ln{i}"), os.readlink(f"{d}/ln{i}"), os.unlink(f"{d}/ln{i}")))
for i in range(500): os.unlink(f"{d}/s{i}")
os.unlink(f"{d}/log")
