"""The onnxruntime session behind the service: provider and variant choice, warm-up, memory."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from serving import model_files
from serving.admission import bound_from_budget
from serving.procfs import PeakRss, available_cores
from serving.model_files import ModelLoadError

log = logging.getLogger("serving")

# cuDNN's EXHAUSTIVE search benchmarks each new batch shape; HEURISTIC picks without benchmarking.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # folder or BentoML tag; None = the model shipped in the repo
    device: str = "auto"  # auto | cuda | cpu
    require_gpu: bool = False
    variant: str = "auto"  # auto | fp32 | int8 | fp16
    max_batch_size: int = 16
    max_wait_ms: float = 0.0
    workers: int = 1  # BentoML worker processes (docs/decisions.md "Workers")
    threads: int = 0  # intra-op threads of the latency lane's session; 0 = the worker's share of the cores
    # the latency lane's idle threads spin (onnxruntime's default); off with several workers,
    # whose spinning threads would take each other's cores
    spinning: bool = True
    # throughput lanes, single-threaded sessions side by side under load: -1 = one per core on a
    # CPU with one worker (else none), 0 = off
    lanes: int = -1
    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    max_batch_images: int = 64
    # at most max_queue images in the service, past it 503 (0 = from the budget, serving/admission.py)
    latency_budget_ms: float = 500.0
    max_queue: int = 0
    # SIGTERM: drain_s more seconds with readiness failing, then in-flight answered within
    # shutdown_timeout_s (serving/drain.py)
    drain_s: float = 5.0
    shutdown_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        """Every range checked here, for settings read from the environment or built in code:
        a bad value stops the start in one line (ModelLoadError)."""
        for ok, rule, got in (
            (self.max_batch_size >= 1, "NIN_MAX_BATCH_SIZE must be >= 1", self.max_batch_size),
            (self.max_wait_ms >= 0, "NIN_MAX_WAIT_MS must be >= 0", self.max_wait_ms),
            (self.threads >= 0, "NIN_THREADS must be >= 0 (0 = auto)", self.threads),
            (self.lanes >= -1, "NIN_LANES must be -1 (auto), 0 (off) or a count", self.lanes),
            (self.max_bytes >= 1, "NIN_MAX_BYTES must be >= 1", self.max_bytes),
            (self.max_pixels >= 1, "NIN_MAX_PIXELS must be >= 1", self.max_pixels),
            (self.max_batch_images >= 1, "NIN_MAX_BATCH_IMAGES must be >= 1", self.max_batch_images),
            (self.latency_budget_ms > 0, "NIN_LATENCY_BUDGET_MS must be > 0", self.latency_budget_ms),
            (self.max_queue >= 0, "NIN_MAX_QUEUE must be >= 0", self.max_queue),
            (self.drain_s >= 0, "NIN_DRAIN_SECONDS must be >= 0", self.drain_s),
            (self.shutdown_timeout_s > 0, "NIN_SHUTDOWN_TIMEOUT must be > 0", self.shutdown_timeout_s),
            (self.device in ("auto", "cuda", "cpu"), "NIN_DEVICE must be auto, cuda or cpu", self.device),
            (self.variant in ("auto", *model_files.VARIANT_FILES), "NIN_VARIANT must be auto, fp32, int8 or fp16", self.variant),
        ):
            if not ok:
                raise ModelLoadError(f"{rule}, got {got!r}")

    @classmethod
    def from_env(cls) -> "Settings":
        e = os.environ.get
        try:
            workers = worker_count(e("NIN_WORKERS", "auto"))
            settings = cls(
                model=e("NIN_MODEL") or None, device=e("NIN_DEVICE", "auto"),
                require_gpu=e("NIN_REQUIRE_GPU", "0").lower() in ("1", "true", "yes"),
                variant=e("NIN_VARIANT", "auto"), max_batch_size=int(e("NIN_MAX_BATCH_SIZE", "16")),
                max_wait_ms=float(e("NIN_MAX_WAIT_MS", "0")), workers=workers, threads=int(e("NIN_THREADS", "0")),
                spinning=e("NIN_ORT_SPINNING", "1" if workers == 1 else "0").lower() in ("1", "true", "yes"),
                lanes=int(e("NIN_LANES", "-1")),
                max_bytes=int(e("NIN_MAX_BYTES", str(10 * 2**20))), max_pixels=int(e("NIN_MAX_PIXELS", str(4096 * 4096))),
                max_batch_images=int(e("NIN_MAX_BATCH_IMAGES", "64")),
                latency_budget_ms=float(e("NIN_LATENCY_BUDGET_MS", "500")), max_queue=int(e("NIN_MAX_QUEUE", "0")),
                drain_s=float(e("NIN_DRAIN_SECONDS", "5")), shutdown_timeout_s=float(e("NIN_SHUTDOWN_TIMEOUT", "20")),
            )
        except ValueError as err:
            raise ModelLoadError(f"bad NIN_* setting: {err}") from None
        return settings


def worker_count(raw: str) -> int:
    """NIN_WORKERS: `auto` (one per two available cores, serving/procfs.py; at least one) or a
    count from 1."""
    n = max(1, available_cores() // 2) if raw.strip().lower() in ("", "auto") else int(raw)
    if n < 1:
        raise ValueError(f"NIN_WORKERS must be auto or at least 1, got {raw!r}")
    return n


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices the driver sees (libcuda's cuInit + cuDeviceGetCount), 0 without a driver.

    Asked before onnxruntime is: its CUDA provider, asked for on a machine without a GPU, prints
    a red "Failed to load libcuda.so.1" error at every start before falling back to the CPU.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


class GpuMemory:
    """GPU memory this process holds, from NVML (onnxruntime has no API for it), sampled every
    0.2 s by a thread, so no NVML query sits in the per-batch path: the latest sample and the peak."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        self.name = pynvml.nvmlDeviceGetName(self._handle)
        self._latest: float | None = None
        self._peak: float | None = None
        self._sample()
        threading.Thread(target=self._loop, name="nvml-sampler", daemon=True).start()

    def _sample(self) -> None:
        pid = os.getpid()
        for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                self._latest = p.usedGpuMemory / 2**20
                self._peak = max(self._peak or 0.0, self._latest)

    def _loop(self) -> None:
        while True:
            time.sleep(0.2)
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a failed sample leaves the last figure standing
                log.debug("GPU memory sample failed", exc_info=True)

    def used_mb(self) -> float | None:
        return None if self._latest is None else round(self._latest, 1)

    def peak_mb(self) -> float | None:
        return None if self._peak is None else round(self._peak, 1)


def check_gpu_requirement(settings: Settings) -> None:
    """Raise ModelLoadError when the settings demand a GPU (NIN_REQUIRE_GPU=1, NIN_DEVICE=cuda)
    that this machine cannot give: checked before any session is made, in one line."""
    if not (settings.require_gpu or settings.device == "cuda"):
        return
    if settings.device == "cpu":
        raise ModelLoadError("NIN_REQUIRE_GPU=1 contradicts NIN_DEVICE=cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ModelLoadError("a GPU is required (NIN_REQUIRE_GPU=1 or NIN_DEVICE=cuda) but this onnxruntime has no "
                             "CUDA execution provider; install onnxruntime-gpu[cuda,cudnn]")
    if cuda_device_count() == 0:
        raise ModelLoadError("a GPU is required (NIN_REQUIRE_GPU=1 or NIN_DEVICE=cuda) but the CUDA driver sees no "
                             "device (libcuda.so.1 missing, or no GPU visible); unset it to serve on the CPU")


def fp16_checked_on_cuda(card: dict) -> bool:
    """Whether the exporter's accuracy gate ran the fp16 variant on the CUDA provider."""
    fp16 = (card.get("variants") or {}).get("fp16") or {}
    return fp16.get("passed", False) and "CUDAExecutionProvider" in fp16.get("checked_on", [])


class Engine:
    """Loads and verifies the model, opens the session, warms up every batch size."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()  # the worker answers say which process they come from
        # explicit, since onnxruntime's default is the node's physical cores, not this worker's share
        self.threads = settings.threads or max(1, available_cores() // settings.workers)
        self.folder = model_files.resolve(settings.model)
        self.card = model_files.load_card(self.folder)
        self.contract = self.card["input_contract"]
        self.class_names = self.card["class_names"]
        self.session, self.provider = self._open_session()
        self.input_name = self.session.get_inputs()[0].name
        self.lane_sessions = self._open_lanes()
        self._rss_lock, self._running, self._peak = threading.Lock(), 0, PeakRss()
        self.gpu = self._gpu_probe()
        self.ready = threading.Event()
        self.warmup_ms: dict[int, float] = {}
        self.full_batch_ms = 0.0  # median of 3 runs at max_batch_size, measured by warm_up()
        # one plain line on every start: what serves, where
        log.info("serving %s variant (%s) on %s%s", self.variant, model_files.VARIANT_FILES[self.variant], self.provider,
                 f" ({self.gpu.name})" if self.gpu else "")

    def _wants_cuda(self) -> bool:
        check_gpu_requirement(self.settings)
        if self.settings.device == "cpu":
            return False
        return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0

    def _open_session(self) -> tuple[ort.InferenceSession, str]:
        s = self.settings
        ort.disable_telemetry_events()  # the service sends nothing anywhere (deploy: egress denied)
        cuda = self._wants_cuda()
        if cuda:
            try:  # CUDA/cuDNN from the nvidia-* pip wheels, when they are installed
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - a missing library shows up as the CPU fallback below
                log.warning("onnxruntime.preload_dlls failed: %s", e)
        session, active = self._session(cuda)
        if (s.require_gpu or s.device == "cuda") and active != "CUDAExecutionProvider":
            raise ModelLoadError(f"a GPU is required (NIN_REQUIRE_GPU/NIN_DEVICE) but onnxruntime runs on {active}; "
                                 "check the CUDA 13 / cuDNN 9 libraries (pip install onnxruntime-gpu[cuda,cudnn])")
        if cuda and active != "CUDAExecutionProvider":
            # onnxruntime falls back silently when the CUDA provider cannot load: say so, and
            # serve the variant meant for CPUs.
            log.warning("the CUDA execution provider could not start on a machine with a GPU; falling back to the CPU")
            session, active = self._session(False)
        return session, active

    def _session(self, cuda: bool, threads: int | None = None) -> tuple[ort.InferenceSession, str]:
        if threads is None:  # the latency lane's (or the GPU's) session; lanes reuse its checked file
            self.variant = self._choose_variant(cuda)
            self.path = model_files.verified_file(self.folder, self.card, self.variant)
        path = self.path
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or self.threads
        if not self.settings.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ([("CUDAExecutionProvider", CUDA_OPTIONS)] if cuda else []) + ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:
            raise ModelLoadError(f"onnxruntime cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return session, session.get_providers()[0]

    def _open_lanes(self) -> list[ort.InferenceSession]:
        """Single-threaded sessions for the throughput lanes (CPU only)."""
        n = self.settings.lanes
        if self.provider != "CPUExecutionProvider" or n == 0:
            return []
        if n == -1:
            n = available_cores()
            if n < 2 or self.settings.workers > 1:
                return []
        return [self._session(False, threads=1)[0] for _ in range(n)]

    def _choose_variant(self, cuda: bool) -> str:
        have = model_files.available_variants(self.card)
        want = self.settings.variant
        if want != "auto":
            return want
        # int8 is fastest on CPUs; fp16 halves memory traffic on GPUs, but only where its
        # accuracy gate ran on the CUDA provider (export on a machine with a GPU); fp32 is always there.
        for v in (["fp16"] if cuda else ["int8"]) + ["fp32"]:
            if v in have and (v != "fp16" or fp16_checked_on_cuda(self.card)):
                return v
        raise ModelLoadError(f"no servable model file in {self.folder} (card lists {have})")

    def _gpu_probe(self) -> GpuMemory | None:
        if self.provider != "CUDAExecutionProvider":
            return None
        try:
            return GpuMemory()
        except Exception as e:  # noqa: BLE001 - memory figures are optional, serving is not
            log.warning("NVML unavailable, no GPU memory figures: %s", e)
            return None

    def warm_up(self) -> None:
        """Run every batch size the batcher can form once, so no request pays for a first run."""
        size = self.contract["image_size"]
        x = np.zeros((self.settings.max_batch_size, self.contract["channels"], size, size), np.float32)
        for b in range(1, self.settings.max_batch_size + 1):
            t = time.perf_counter()
            self.session.run(None, {self.input_name: x[:b]})
            self.warmup_ms[b] = round((time.perf_counter() - t) * 1000, 2)
            for lane in self.lane_sessions:
                lane.run(None, {self.input_name: x[:b]})
        full = []
        for _ in range(3):
            t = time.perf_counter()
            self.session.run(None, {self.input_name: x})
            full.append((time.perf_counter() - t) * 1000)
        self.full_batch_ms = round(sorted(full)[1], 2)
        self.ready.set()
        log.info("warm-up done for batch sizes 1..%d on %d session(s)", self.settings.max_batch_size,
                 1 + len(self.lane_sessions))

    def queue_bound(self) -> int | None:
        """Images the service admits at once: NIN_MAX_QUEUE, or derived once warm-up has timed a batch."""
        if self.settings.max_queue:
            return self.settings.max_queue
        if not self.full_batch_ms:
            return None
        return bound_from_budget(self.settings.latency_budget_ms, self.full_batch_ms, self.settings.max_batch_size)

    def run(self, x: np.ndarray, lane: int | None = None) -> tuple[np.ndarray, dict]:
        """Logits for a batch on the latency lane (None) or throughput lane `lane`, with the
        process's peak RSS over the run: reset when no other batch is running, so with lanes
        side by side it is the peak since the first of them started (never an undercount)."""
        with self._rss_lock:
            if self._running == 0:
                self._peak.reset()
            self._running += 1
        try:
            session = self.session if lane is None else self.lane_sessions[lane]
            logits = session.run(None, {self.input_name: x})[0]
        finally:
            with self._rss_lock:
                self._running -= 1
        info = {"peak_rss_mb": round((self._peak.read_kb() or 0) / 1024, 1), "lane": "latency" if lane is None else lane}
        if self.gpu is not None:
            info["gpu_mb"] = self.gpu.used_mb()  # the sampler's latest figure: no NVML call here
        return logits, info

    def describe(self) -> dict:
        return {
            "model_folder": str(Path(self.folder).resolve()),
            "pid": os.getpid(),
            "variant": self.variant,
            "provider": self.provider,
            "available_providers": ort.get_available_providers(),
            "gpu": self.gpu.name if self.gpu else None,
            "gpu_memory_mb": {"used": self.gpu.used_mb(), "peak": self.gpu.peak_mb()} if self.gpu else None,
            "input_contract": self.contract,
            "class_names": self.class_names,
            "workers": self.settings.workers,
            "batching": {"max_batch_size": self.settings.max_batch_size, "max_wait_ms": self.settings.max_wait_ms,
                         "throughput_lanes": len(self.lane_sessions), "latency_lane_threads": self.threads,
                         "latency_lane_spinning": self.settings.spinning},
            "limits": {"max_bytes": self.settings.max_bytes, "max_pixels": self.settings.max_pixels,
                       "max_batch_images": self.settings.max_batch_images,
                       "latency_budget_ms": self.settings.latency_budget_ms, "max_queue": self.queue_bound(),
                       "full_batch_ms": self.full_batch_ms},
            "ready": self.ready.is_set(),
            "warmup_ms": self.warmup_ms,
            "card": {k: v for k, v in self.card.items() if k not in ("confusion_matrix",)},
        }


