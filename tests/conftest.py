"""Shared fixtures: stores on disk and in memory, a real dask cluster, memory probes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    """A factory of fresh store URLs: a local directory or an fsspec memory:// URL."""

    def make(name="ds"):
        if request.param == "local":
            return str(tmp_path / f"{name}.zarr")
        return f"memory://{uuid.uuid4().hex}/{name}"

    make.kind = request.param
    return make


def _wait_for(path, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            try:
                return json.loads(Path(path).read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


class RealCluster:
    """A `dask scheduler` and `dask worker` processes on 127.0.0.1."""

    def __init__(self, n_workers=2, nthreads=1, memory_limit="2GiB"):
        self.dir = tempfile.mkdtemp(prefix="pipeline-cluster-")
        self.scheduler_file = os.path.join(self.dir, "scheduler.json")
        self.procs = []
        bindir = os.path.dirname(sys.executable)
        dask = os.path.join(bindir, "dask")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        log = open(os.path.join(self.dir, "scheduler.log"), "w")
        self.procs.append(subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", self.scheduler_file], stdout=log, stderr=subprocess.STDOUT, env=env))
        info = _wait_for(self.scheduler_file)
        self.address = info["address"]
        self.dashboard_port = info.get("services", {}).get("dashboard")
        self.workers = []
        for i in range(n_workers):
            self.add_worker(nthreads, memory_limit, name=f"w{i}")
        self.wait_for_workers(n_workers)

    def add_worker(self, nthreads=1, memory_limit="2GiB", name=None):
        bindir = os.path.dirname(sys.executable)
        log = open(os.path.join(self.dir, f"worker-{len(self.workers)}.log"), "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        p = subprocess.Popen(
            [os.path.join(bindir, "dask"), "worker", self.address, "--nthreads", str(nthreads),
             "--nworkers", "1", "--memory-limit", memory_limit, "--host", "127.0.0.1",
             "--no-dashboard"] + (["--name", name] if name else []),
            stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        self.workers.append(p)
        return p

    def wait_for_workers(self, n, timeout=60):
        from distributed import Client

        with Client(self.address, timeout=timeout) as c:
            c.wait_for_workers(n, timeout=timeout)

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_cluster():
    """A real `dask scheduler` + two single-threaded `dask worker` processes."""
    cluster = RealCluster(n_workers=2, nthreads=1)
    try:
        yield cluster
    finally:
        cluster.close()


def row_chunks(sizes, n):
    """Row chunks of ``n`` rows from drawn ``sizes``: each size in turn, the rest last."""
    chunks, left = [], n
    for s in sizes:
        if left == 0:
            break
        chunks.append(min(s, left))
        left -= chunks[-1]
    if left:
        chunks.append(left)
    return tuple(chunks)


def run_measured(code, *, setup="", imports="import pipeline, numpy, dask.array, zarr", timeout=600):
    """Run ``code`` in a fresh Python; return (peak RSS above idle in bytes, stdout).

    The idle reference is a separate process that runs the same ``imports`` and
    ``setup`` (and a tiny GEMM, so BLAS has loaded) and nothing else: the difference is
    what the operation added, which is what a memory budget promises.  Both run with
    glibc's allocator limited (``pipeline.runtime.limit_malloc``), as the ``pipeline``
    command and the workers of ``connect("local")`` do: otherwise glibc may keep freed
    blocks resident, and RSS measures its caching, not what the operation holds.
    """
    prelude = textwrap.dedent(f"""
        import resource, sys
        {imports}
        import pipeline.runtime as _rt
        _rt.limit_malloc()
        import numpy as _np
        _np.ones((64, 64)) @ _np.ones((64, 64))
    """)
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (it
    # survives fork + exec), so under a large pytest process it would read the parent.
    probe = textwrap.dedent("""
        with open("/proc/self/status") as _f:
            _hwm = [ln for ln in _f if ln.startswith("VmHWM:")][0]
        print("PEAK", int(_hwm.split()[1]) * 1024)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    peaks, out = [], ""
    for body in ("", textwrap.dedent(code)):
        src = prelude + textwrap.dedent(setup) + "\n" + body + "\n" + probe
        if not body and src in _IDLE:
            peaks.append(_IDLE[src])
            continue
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                           timeout=timeout, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("PEAK")][-1]
        peaks.append(int(line.split()[1]))
        if not body:
            _IDLE[src] = peaks[-1]
        out = r.stdout
    return peaks[1] - peaks[0], out


_IDLE = {}


def record_step_widths(monkeypatch):
    """The training rows of every k-NN GEMM step run from now on (``kernels.topk.knn_steps`` spied)."""
    import pipeline.kernels.topk as topk

    widths = []
    real = topk.knn_steps

    def spy(queries, steps, k, **kw):
        def seen():
            for off, rows in steps:
                widths.append(rows.shape[0])
                yield off, rows
        return real(queries, seen(), k, **kw)

    monkeypatch.setattr(topk, "knn_steps", spy)
    return widths
