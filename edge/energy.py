"""Energy per inference: device compute, radio transfer and server compute, in millijoules.

    device_mj = CPU seconds of the device half x active W per busy core     (method "cpu_time")
              | the package's RAPL energy counter around the device half      (method "rapl")
    radio_mj  = bytes sent x uplink nJ/byte + bytes received x downlink nJ/byte
              + the radio's active power x the round trip (it stays awake until the answer arrives)
              [+ tail power x tail time, with include_tail]
    server_mj = server seconds x W per busy core

Profiles are JSON files in ``splitinfer/edge/profiles/`` (devices: pi4, pi5, laptop; links: wifi,
lte, ethernet; servers: xeon). Every number carries a ``source``; a custom file has the same
shape (see :func:`load_energy_file`). Device power is *marginal*: what a busy core adds above idle,
so the figures compare ways of doing the same work rather than the cost of keeping a board on.

The radio tail (the radio lingering in a high-power state after a transfer: 11.6 s on LTE) is kept
in the profiles but not charged by default: back-to-back requests share one tail, and charging a
whole tail to each request would count the same energy many times. Set ``include_tail`` for
requests that arrive seconds apart.

The label (A..G) rates a request's energy, or a run's mean, against running the whole model on the
device: see :data:`LABEL_BANDS`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

__all__ = [
    "PROFILE_DIR", "RAPL_ENERGY_PATH", "LABEL_BANDS", "DEVICE_PROFILES", "LINK_PROFILES", "SERVER_PROFILES",
    "DeviceProfile", "LinkProfile", "ServerProfile", "EnergyEstimate", "EnergyModel", "DeviceEnergyMeter",
    "load_profiles", "device_profile", "link_profile", "server_profile", "load_energy_file", "energy_label",
    "median_mj", "EnergyReference", "measure_reference", "reference_energy", "default_cache_path",
]

PROFILE_DIR = Path(__file__).with_name("profiles")
RAPL_ENERGY_PATH = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
DEVICE_PROFILES = ("pi4", "pi5", "laptop")
LINK_PROFILES = ("wifi", "lte", "ethernet")
SERVER_PROFILES = ("xeon",)

# Upper edge of each band on energy / (energy of the whole model on the device). Equal steps of 0.15
# from F (no saving) down to B; A is a saving of 4x or more; G costs more than not splitting at all.
LABEL_BANDS: tuple[tuple[str, float], ...] = (
    ("A", 0.25), ("B", 0.40), ("C", 0.55), ("D", 0.70), ("E", 0.85), ("F", 1.00), ("G", math.inf),
)


def energy_label(ratio: float) -> str:
    """Energy ratio to the whole model on the device (>= 0) -> "A" (best) .. "G" (worse than local)."""
    if not ratio >= 0.0:  # also rejects NaN
        raise ValueError(f"energy ratio must be >= 0, got {ratio}")
    for label, upper in LABEL_BANDS:
        if ratio <= upper:
            return label
    return LABEL_BANDS[-1][0]


def _positive(name: str, value: float, allow_zero: bool = True) -> None:
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """The device that runs the device half. active_w_per_core: W a busy core adds above idle_w."""

    name: str
    active_w_per_core: float
    idle_w: float = 0.0
    cores: int = 1
    battery_wh: float = 0.0  # battery capacity in Wh (0: none, e.g. a mains-powered board); see battery.py
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive("active_w_per_core", self.active_w_per_core, allow_zero=False)
        _positive("idle_w", self.idle_w)
        _positive("battery_wh", self.battery_wh)
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ValueError(f"cores must be an integer >= 1, got {self.cores!r}")


@dataclass(frozen=True)
class LinkProfile:
    """The network the device offloads over. Per-byte energies in nJ; powers in W; tail_s in seconds."""

    name: str
    uplink_nj_per_byte: float
    downlink_nj_per_byte: float
    active_w: float = 0.0
    tail_w: float = 0.0
    tail_s: float = 0.0
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("uplink_nj_per_byte", "downlink_nj_per_byte", "active_w", "tail_w", "tail_s"):
            _positive(name, getattr(self, name))

    @property
    def tail_mj(self) -> float:
        return self.tail_w * self.tail_s * 1e3


@dataclass(frozen=True)
class ServerProfile:
    """The machine that runs the server half: W per busy core (one core per request)."""

    name: str
    w_per_busy_core: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive("w_per_busy_core", self.w_per_busy_core)


_KINDS = {"devices": DeviceProfile, "links": LinkProfile, "servers": ServerProfile}


def _profile_from_json(kind: type, data: Mapping, where: str):
    """{"name": str, field: {"value": number, "source": str}, ...} -> a profile, or ValueError."""
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        raise ValueError(f"{where}: a profile is an object with a 'name' string")
    fields = {f for f in kind.__dataclass_fields__ if f not in ("name", "sources")}
    unknown = set(data) - fields - {"name"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; expected some of {sorted(fields)}")
    values, sources = {}, {}
    for key in fields & set(data):
        entry = data[key]
        if not isinstance(entry, Mapping) or not isinstance(entry.get("value"), (int, float)) \
                or isinstance(entry.get("value"), bool):
            raise ValueError(f"{where}.{key}: must be {{'value': number, 'source': text}}, got {entry!r}")
        source = entry.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{where}.{key}: every number needs a non-empty 'source'")
        values[key], sources[key] = entry["value"], source
    try:
        return kind(name=data["name"], sources=sources, **values)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def load_profiles(kind: str, path: str | PathLike | None = None) -> dict:
    """kind in devices/links/servers -> {key: profile} from the built-in file (or ``path``)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    path = Path(path) if path is not None else PROFILE_DIR / f"{kind}.json"
    data = _read_json(path)
    return {key: _profile_from_json(_KINDS[kind], value, f"{path.name}:{key}") for key, value in data.items()}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read energy profile {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return data


def _named(kind: str, name_or_path: str | PathLike):
    profiles = load_profiles(kind)
    if str(name_or_path) in profiles:
        return profiles[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix.lower() == ".json" or path.is_file():
        return _profile_from_json(_KINDS[kind], _read_json(path), path.name)
    raise ValueError(f"unknown {kind[:-1]} profile {str(name_or_path)!r}: use one of {sorted(profiles)} or a JSON file")


def device_profile(name_or_path: str | PathLike) -> DeviceProfile:
    """"pi4", "pi5", "laptop", or a JSON file holding one device profile."""
    return _named("devices", name_or_path)


def link_profile(name_or_path: str | PathLike) -> LinkProfile:
    """"wifi", "lte", "ethernet", or a JSON file holding one link profile."""
    return _named("links", name_or_path)


def server_profile(name_or_path: str | PathLike = "xeon") -> ServerProfile:
    return _named("servers", name_or_path)


@dataclass(frozen=True)
class EnergyEstimate:
    """Energy of one request in mJ; method says how device_mj was obtained ("cpu_time" or "rapl")."""

    device_mj: float
    radio_mj: float
    server_mj: float
    total_mj: float
    method: str

    def __post_init__(self) -> None:
        for name in ("device_mj", "radio_mj", "server_mj", "total_mj"):
            _positive(name, getattr(self, name))
        if not math.isclose(self.total_mj, self.device_mj + self.radio_mj + self.server_mj, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"total_mj {self.total_mj} != device + radio + server")

    @classmethod
    def of(cls, device_mj: float, radio_mj: float, server_mj: float, method: str) -> "EnergyEstimate":
        return cls(device_mj, radio_mj, server_mj, device_mj + radio_mj + server_mj, method)


@dataclass(frozen=True)
class EnergyModel:
    """Turns measured CPU time, bytes and times into an :class:`EnergyEstimate`."""

    device: DeviceProfile
    link: LinkProfile
    server: ServerProfile
    include_tail: bool = False

    @classmethod
    def named(cls, device: str | PathLike = "pi4", link: str | PathLike = "wifi",
              server: str | PathLike = "xeon", include_tail: bool = False) -> "EnergyModel":
        return cls(device_profile(device), link_profile(link), server_profile(server), include_tail)

    def device_mj(self, cpu_s: float) -> float:
        """CPU seconds (summed over the threads that ran the device half) -> mJ."""
        return max(cpu_s, 0.0) * self.device.active_w_per_core * 1e3

    def radio_mj(self, bytes_up: float, bytes_down: float, active_s: float) -> float:
        """Bytes sent and received, seconds the radio is awake for the exchange -> mJ (0 when nothing sent)."""
        if bytes_up <= 0:
            return 0.0
        energy = (bytes_up * self.link.uplink_nj_per_byte + bytes_down * self.link.downlink_nj_per_byte) * 1e-6
        energy += self.link.active_w * max(active_s, 0.0) * 1e3
        if self.include_tail:
            energy += self.link.tail_mj
        return energy

    def server_mj(self, server_s: float) -> float:
        return max(server_s, 0.0) * self.server.w_per_busy_core * 1e3

    def estimate(self, device_mj: float, bytes_up: float = 0, bytes_down: float = 0, round_trip_s: float = 0.0,
                 server_s: float = 0.0, method: str = "cpu_time") -> EnergyEstimate:
        """One request: device energy (measured), bytes, the offload's round trip and server compute time."""
        return EnergyEstimate.of(device_mj, self.radio_mj(bytes_up, bytes_down, round_trip_s),
                                 self.server_mj(server_s) if bytes_up > 0 else 0.0, method)


def load_energy_file(path: str | PathLike, base: EnergyModel | None = None) -> EnergyModel:
    """A custom profile file: {"device": {...}, "link": {...}, "server": {...}}, each optional, each in
    the built-in files' shape (name plus {"value", "source"} per number); missing sections come from
    ``base`` (default: pi4, wifi, xeon)."""
    path = Path(path)
    data = _read_json(path)
    unknown = set(data) - {"device", "link", "server", "include_tail"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected device, link, server")
    base = base or EnergyModel.named()
    return EnergyModel(
        device=_profile_from_json(DeviceProfile, data["device"], f"{path.name}:device") if "device" in data else base.device,
        link=_profile_from_json(LinkProfile, data["link"], f"{path.name}:link") if "link" in data else base.link,
        server=_profile_from_json(ServerProfile, data["server"], f"{path.name}:server") if "server" in data else base.server,
        include_tail=bool(data.get("include_tail", base.include_tail)),
    )


class DeviceEnergyMeter:
    """Energy of a block of device work, in mJ.

    With a readable RAPL counter (``/sys/class/powercap/intel-rapl:0/energy_uj``, Intel/AMD Linux,
    often root-only) the package's energy is read before and after (method "rapl": the whole
    package, other processes and idle power included; the counter ticks about every millisecond,
    so single requests are coarse and means over many are sound). Otherwise the process's CPU time
    (``time.process_time``: every thread, ONNX Runtime's workers included) times the profile's
    active W per core (method "cpu_time"). ``rapl_path=None`` forces CPU time.
    """

    def __init__(self, profile: DeviceProfile, rapl_path: str | PathLike | None = RAPL_ENERGY_PATH,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.profile = profile
        self._cpu_clock = cpu_clock
        self._rapl = Path(rapl_path) if rapl_path is not None and _readable_counter(Path(rapl_path)) else None
        self._rapl_range_uj = _read_int(self._rapl.with_name("max_energy_range_uj")) if self._rapl else None
        self.method = "rapl" if self._rapl is not None else "cpu_time"

    def read(self) -> float:
        """An opaque reading; pass two to :meth:`mj_between`."""
        if self._rapl is not None:
            value = _read_int(self._rapl)
            if value is not None:
                return float(value)
        return self._cpu_clock()

    def mj_between(self, before: float, after: float) -> float:
        if self._rapl is not None:
            delta = after - before
            if delta < 0 and self._rapl_range_uj:
                delta += self._rapl_range_uj  # the counter wrapped
            return max(delta, 0.0) * 1e-3
        return max(after - before, 0.0) * self.profile.active_w_per_core * 1e3


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _readable_counter(path: Path) -> bool:
    return _read_int(path) is not None


def median_mj(work: Callable[[], object], meter: DeviceEnergyMeter, repeats: int = 20, warmup: int = 3) -> float:
    """Median energy in mJ of ``work()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        work()
    samples = []
    for _ in range(repeats):
        before = meter.read()
        work()
        samples.append(meter.mj_between(before, meter.read()))
    samples.sort()
    mid = len(samples) // 2
    return samples[mid] if len(samples) % 2 else 0.5 * (samples[mid - 1] + samples[mid])


@dataclass(frozen=True)
class EnergyReference:
    """Device energy of the device half and of the whole model on this device, measured the same
    way: the device half, then the server half on every token of the same input, interleaved run
    by run, median of ``repeats`` each. whole_model_mj = device_half_mj + server_half_mj, so an
    input answered on the device is never dearer than the whole model run here."""

    device_half_mj: float
    server_half_mj: float
    repeats: int
    method: str
    measured_at: float = 0.0

    @property
    def whole_model_mj(self) -> float:
        return self.device_half_mj + self.server_half_mj

    def ratio(self, device_requests: int, radio_mj: float, server_mj: float, requests: int) -> float:
        """Mean energy per request over the whole model on the device: each request costs the
        device half (the same measurement), plus its radio and server energy (sums given)."""
        if requests <= 0 or self.whole_model_mj <= 0:
            return float("nan")
        return (requests * self.device_half_mj + radio_mj + server_mj) / (requests * self.whole_model_mj)


def measure_reference(manifest, device_run: Callable[[dict], object], inputs: dict, meter: DeviceEnergyMeter,
                      repeats: int = 50, warmup: int = 5) -> EnergyReference:
    """Measure :class:`EnergyReference` on ``inputs`` (device inputs of one real input): the whole
    model on the device, so ``device_run(inputs, second_view=False)`` (a
    :meth:`~splitinfer.edge.session.DeviceSession.run`) skips an exit policy's second view."""
    import numpy as np
    import onnxruntime as ort

    from splitinfer.protos import graphs

    if repeats < 5:
        raise ValueError(f"repeats must be >= 5, got {repeats}")
    manifest.verify(("server",))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    server = ort.InferenceSession(str(manifest.server_path), opts, providers=["CPUExecutionProvider"])
    tokens = device_run(inputs, second_view=False)[1]
    feed = {graphs.TOKENS: tokens, graphs.MASK: np.ones(tokens.shape[:2], dtype=bool)}
    device, rest = [], []
    for i in range(warmup + repeats):
        before = meter.read()
        device_run(inputs, second_view=False)
        middle = meter.read()
        server.run(None, feed)
        after = meter.read()
        if i >= warmup:
            device.append(meter.mj_between(before, middle))
            rest.append(meter.mj_between(middle, after))
    return EnergyReference(float(np.median(device)), float(np.median(rest)), repeats, meter.method, time.time())


def reference_energy(manifest, device_run: Callable[[dict], object], inputs: dict, meter: DeviceEnergyMeter,
                     half: str = "float", cache: str | PathLike | None = None, refresh: bool = False,
                     repeats: int = 50) -> tuple[EnergyReference, str]:
    """The energy reference of this model on this device: read from the cache (one entry per model
    version, device half, CPU and meter), else measured once and stored. Returns (reference, how):
    how is "cached" or "measured". ``splitinfer-edge bench`` refreshes it."""
    from splitinfer.protos.manifest import cpu_signature

    path = Path(cache) if cache is not None else default_cache_path()
    cpu = cpu_signature()
    key = f"{manifest.name}:{manifest.version}:{half}:{cpu['machine']}:{cpu['model']}:{meter.method}:{meter.profile.name}"
    entries: dict = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
    if not refresh and isinstance(entries.get(key), dict):
        try:
            return EnergyReference(**entries[key]), "cached"
        except TypeError:
            pass
    ref = measure_reference(manifest, device_run, inputs, meter, repeats=repeats)
    entries[key] = dataclasses.asdict(ref)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only home still gets its label, measured every time
        logger.warning("cannot cache the energy reference in %s: %s", path, exc)
    return ref, "measured"


def default_cache_path() -> Path:
    base = os.environ.get("SPLITINFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "splitinfer")
    return Path(base) / "energy.json"
