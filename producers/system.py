"""System metrics: what the process, its node and its GPU do while a run trains (docs/system-metrics.md).

One daemon thread per process (`runwatch-system`) samples every `system_metrics_interval` seconds (10 by
default, as MLflow and Aim) and logs the figures into every run this process has open, as metrics under the
reserved prefix `system/` (runwatch.core.names.SYSTEM_PREFIX), kept out of `get_metrics()` unless asked for:

- per process: CPU % (of one core), resident memory, threads, open files, bytes read and written;
- per node (reported by the node's local rank 0 only): CPU %, memory, disk use and I/O, network I/O;
- per GPU through NVML (the `gpu` extra: nvidia-ml-py), the GPU this rank uses: utilisation, memory used,
  temperature, power. Without NVML or without a GPU this part is absent, not an error.

On a run with several ranks (RANK / WORLD_SIZE set, as the launcher, torchrun and Lightning set them) the
process and GPU names carry the rank (`system/rank1/process/cpu_percent`) and the node names the node
(`system/node0/...`), so that every rank's figures are kept apart in one run. The sampler never raises into
training: a figure that cannot be read is left out of that sample (logged once at debug level).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from runwatch.core.names import SYSTEM_PREFIX

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("runwatch.system")
MB = 1 << 20


class Layout:
    """Where this process sits in a distributed run: its rank, its node, and whether it reports the node."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        get = (lambda *n: next((int(env[k]) for k in n if str(env.get(k, "")).strip().isdigit()), None))
        self.world = get("WORLD_SIZE", "RUNWATCH_WORLD_SIZE") or 1
        self.rank = get("RANK", "RUNWATCH_RANK") or 0
        self.local_rank = get("LOCAL_RANK", "RUNWATCH_LOCAL_RANK") or 0
        self.node = get("GROUP_RANK", "NODE_RANK", "RUNWATCH_NODE_RANK") or 0
        self.reports_node = self.local_rank == 0

    def process_prefix(self) -> str:
        return f"{SYSTEM_PREFIX}rank{self.rank}/" if self.world > 1 else SYSTEM_PREFIX

    def node_prefix(self) -> str:
        return f"{SYSTEM_PREFIX}node{self.node}/" if self.world > 1 else SYSTEM_PREFIX


class Gpu:
    """The GPU this rank uses, through NVML; `available` is False without nvidia-ml-py, a driver or a GPU."""

    def __init__(self, layout: Layout):
        self.handle = None
        self.index: int | None = None
        try:
            import pynvml  # nvidia-ml-py, the `gpu` extra
        except ImportError:
            self.why = "nvidia-ml-py is not installed (pip install 'runwatch[gpu]')"
            return
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
            self.why = f"NVML is not usable here ({type(exc).__name__}: {exc})"
            return
        if count < 1:
            self.why = "NVML sees no GPU"
            return
        self.index = self.device_index(layout, count)
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.why = ""
        except Exception as exc:
            self.why = f"NVML cannot open GPU {self.index} ({type(exc).__name__}: {exc})"

    @staticmethod
    def device_index(layout: Layout, count: int, visible: str | None = None) -> int:
        """The physical index of the GPU this rank uses: its local rank's entry in CUDA_VISIBLE_DEVICES (when it
        lists indices), else its local rank, modulo the GPUs there are."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        slot = layout.local_rank
        if visible:
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if ids and all(i.isdigit() for i in ids):
                return int(ids[slot % len(ids)]) % count
        return slot % count

    @property
    def available(self) -> bool:
        return self.handle is not None

    def sample(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n, h, out = self.nvml, self.handle, {}
        reads: list[tuple[str, Callable[[], float]]] = [
            ("utilization_percent", lambda: float(n.nvmlDeviceGetUtilizationRates(h).gpu)),
            ("memory_used_mb", lambda: n.nvmlDeviceGetMemoryInfo(h).used / MB),
            ("temperature_c", lambda: float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))),
            ("power_w", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0),
        ]
        for name, read in reads:
            try:
                out[name] = read()
            except Exception:  # a figure this GPU does not report (power on some boards)
                pass
        return out


class Sampler:
    """Reads the figures; `sample()` returns {name under system/: value}. Never raises."""

    def __init__(self, layout: Layout | None = None):
        import psutil

        self.psutil = psutil
        self.layout = layout or Layout()
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # the first call only starts the interval
        psutil.cpu_percent(None)
        self.gpu = Gpu(self.layout)
        self._failed: set[str] = set()

    def _read(self, name: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as exc:
            if name not in self._failed:
                self._failed.add(name)
                log.debug("runwatch: system metric %s cannot be read here (%s)", name, exc)
            return None

    def sample(self) -> dict[str, float]:
        ps, p = self.psutil, self.proc
        out: dict[str, float] = {}
        pp = self.layout.process_prefix() + "process/"
        with p.oneshot():
            mem = self._read("rss", p.memory_info)
            io = self._read("io", p.io_counters) if hasattr(p, "io_counters") else None
            values = {"cpu_percent": self._read("cpu", lambda: p.cpu_percent(None)),
                      "rss_mb": mem.rss / MB if mem else None,
                      "threads": self._read("threads", p.num_threads),
                      "open_files": self._read("open_files", lambda: len(p.open_files())),
                      "read_mb": io.read_bytes / MB if io else None,
                      "write_mb": io.write_bytes / MB if io else None}
        out.update({pp + k: float(v) for k, v in values.items() if v is not None})
        if self.layout.reports_node:
            npfx = self.layout.node_prefix() + "node/"
            vm = self._read("memory", ps.virtual_memory)
            disk = self._read("disk", lambda: ps.disk_usage(os.path.abspath(os.sep)))
            dio = self._read("disk_io", ps.disk_io_counters)
            net = self._read("net", ps.net_io_counters)
            values = {"cpu_percent": self._read("node_cpu", lambda: ps.cpu_percent(None)),
                      "memory_percent": vm.percent if vm else None,
                      "memory_used_mb": (vm.total - vm.available) / MB if vm else None,
                      "disk_percent": disk.percent if disk else None,
                      "disk_read_mb": dio.read_bytes / MB if dio else None,
                      "disk_write_mb": dio.write_bytes / MB if dio else None,
                      "net_sent_mb": net.bytes_sent / MB if net else None,
                      "net_recv_mb": net.bytes_recv / MB if net else None}
            out.update({npfx + k: float(v) for k, v in values.items() if v is not None})
        gp = self.layout.process_prefix() + "gpu/"
        out.update({gp + k: v for k, v in self.gpu.sample().items()})
        return out


class Monitor:
    """The process's sampling thread and the runs it reports into (weakly held: a run that is gone is
    dropped). Started by the first run watched, when `system_metrics` is on."""

    def __init__(self, interval: float):
        self.interval = interval
        self._runs: dict[str, weakref.ref] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler: Sampler | None = None
        self.samples = 0
        self.seconds = 0.0  # CPU time the sampling took on its thread (benchmarks/system.py)

    def watch(self, run: "Run") -> None:
        with self._lock:
            if run.parent_id is not None and run.parent_id in self._runs:
                return  # the parent already carries this process's figures
            self._runs[run.id] = weakref.ref(run)
            self._start()

    def _start(self) -> None:  # with the lock held
        if self._runs and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._main, name="runwatch-system", daemon=True)
            self._thread.start()

    def unwatch(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def watching(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def _main(self) -> None:
        try:
            self._sampler = Sampler()
        except Exception as exc:  # psutil missing or broken: no system metrics, training goes on
            log.warning("runwatch: system metrics are off in this process (%s)", exc)
            return
        step = 0
        while True:
            if self._wake.wait(self.interval):
                return
            with self._lock:
                runs = [r for r in (ref() for ref in self._runs.values()) if r is not None]
            if not runs:
                continue
            t0 = time.thread_time()
            try:
                figures = self._sampler.sample()
                for run in runs:
                    run._log_system(figures, step)
            except Exception as exc:  # never into training
                log.debug("runwatch: a system sample failed (%s)", exc)
            self.seconds += time.thread_time() - t0
            self.samples += 1
            step += 1

    def stop(self) -> None:
        self._wake.set()


_monitor: Monitor | None = None
_monitor_lock = threading.Lock()


def monitor(interval: float) -> Monitor:
    global _monitor
    with _monitor_lock:
        if _monitor is None or _monitor._wake.is_set() or _monitor.interval != interval:
            old, _monitor = _monitor, Monitor(interval)
            if old is not None:  # another interval (a workspace with other settings): its runs move over
                old.stop()
                with old._lock, _monitor._lock:
                    _monitor._runs.update(old._runs)
                    _monitor._start()
        return _monitor


def unwatch(run_id: str) -> None:
    """`run_id` out of the process's monitor, if there is one (a run that ends)."""
    mon = _monitor
    if mon is not None:
        mon.unwatch(run_id)


def _after_fork() -> None:  # a forked child (a DataLoader worker) has no sampling thread and reports nothing
    global _monitor
    _monitor = None


os.register_at_fork(after_in_child=_after_fork)
