"""Run configuration: presets (``bench/configs/*.toml``) < method defaults < preset method sections < flags.

A preset has a ``[run]`` table (dataset, architecture, methods, evaluation sizes, ...) and optional
``[method.<name>]`` tables that override that method's defaults (a smoke preset shortens the epochs), after a
``[method."*"]`` table whose keys apply to every method that has them. Flags given on
the command line win over both. The resolved :class:`RunConfig` is what a run directory is named after (a hash of
the settings that change the trained weights) and what ``config.json`` records.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import BenchError, choice_error
from .precision import PRECISIONS  # noqa: F401  (re-exported: fp32, bf16, fp64)

try:  # Python ≥ 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

RUN_KEYS = {"methods", "dataset", "arch", "seeds", "subset", "eval_n", "aa_n", "probe_n", "attacks", "normalize",
            "precision", "eval_batch_size", "aa_chunk", "channels_last", "compile"}
# run settings a preset may also set per method ([method.natural] subset = 50: pre-train on more data)
METHOD_RUN_KEYS = ("subset",)
# the method whose run is the starting model of a method that starts from a trained one (``Method.starts_from``)
STARTING_METHOD = {"natural": "natural", "adversarial": "pgd-at"}


def method_run_setting(preset: dict[str, Any], method: str, key: str, default: Any) -> Any:
    """A run setting for one method: ``[method.<name>]``, else ``[method."*"]``, else ``default``."""
    tables = preset.get("method", {})
    for t in (tables.get(method, {}), tables.get("*", {})):
        if key in t:
            return t[key]
    return default


# ---------------------------------------------------------------------------------------------------------------
# presets


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("bench.configs").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str | None) -> dict[str, Any]:
    """A preset by name (``smoke``, ``paper``) or path to a TOML file; ``None`` is the empty preset."""
    if name is None:
        return {"run": {}, "method": {}, "name": None}
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
    elif name in preset_names():
        text = (resources.files("bench.configs") / f"{name}.toml").read_text()
    else:
        raise choice_error("preset", name, preset_names() + ["<path>.toml"])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"preset {name} is not valid TOML ({e})") from None
    check_preset(name, data)
    return {"run": _canonical_methods(name, data.get("run", {})), "method": _canonical_tables(name, data),
            "name": name, "description": data.get("description", "")}


def _canonical_methods(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with its ``methods`` under their registered names (an alias such as ``vaft-d`` is ``vaft+d``)."""
    from methods import METHODS

    if "methods" not in run:
        return run
    return {**run, "methods": [METHODS.canonical(m) for m in run["methods"]]}


def _canonical_tables(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The ``[method.<name>]`` tables keyed by registered names; one method named by two tables is an error."""
    from methods import METHODS

    out: dict[str, Any] = {}
    for m, t in data.get("method", {}).items():
        key = m if m == "*" else METHODS.canonical(m)
        if key in out:
            raise BenchError(f"preset {name}: [method.{m}] and another table both name {key}; accepted: one table "
                             "per method")
        out[key] = t
    return out


def check_preset(name: str, data: dict[str, Any]) -> None:
    """One line for a preset's shape errors, when it is loaded (before anything runs): unknown tables and keys,
    ``methods`` that is not a list of method names, seeds that are not non-negative integers, a ``[method]`` entry
    that is not a table of a registered method (a typo such as ``[method.natral]``)."""
    from methods import METHODS

    unknown_top = sorted(set(data) - {"run", "method", "description"})
    if unknown_top:
        raise BenchError(f"preset {name}: unknown table or key {unknown_top[0]!r}; accepted: description, [run], "
                         "[method.<name>]")
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise BenchError(f"preset {name}: run = {run!r}; accepted: a [run] table")
    unknown = set(run) - RUN_KEYS
    if unknown:
        raise BenchError(f"preset {name}: unknown [run] key {sorted(unknown)[0]!r}; accepted: "
                         f"{', '.join(sorted(RUN_KEYS))}")
    if "methods" in run:
        ms = run["methods"]
        if not isinstance(ms, list) or not ms or not all(isinstance(m, str) for m in ms):
            raise BenchError(f"preset {name}: methods = {ms!r}; accepted: a list of method names, e.g. "
                             "[\"natural\", \"pgd-at\"]")
        for m in ms:
            if m not in METHODS:
                raise choice_error(f"method in preset {name}'s methods", m, METHODS.names())
    if "seeds" in run:
        seeds = run["seeds"]
        ok = isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                       for x in seeds)
        if not ok and not isinstance(seeds, str):
            raise BenchError(f"preset {name}: seeds = {seeds!r}; accepted: a list of non-negative integers, e.g. "
                             "[0, 1, 2]")
    tables = data.get("method", {})
    if not isinstance(tables, dict):
        raise BenchError(f"preset {name}: method = {tables!r}; accepted: [method.<name>] tables")
    for m, t in tables.items():
        if m != "*" and m not in METHODS:
            raise choice_error(f"method table [method.{m}] in preset {name}", m, ["*", *METHODS.names()])
        if not isinstance(t, dict):
            raise BenchError(f"preset {name}: [method] {m} = {t!r}; accepted: a table [method.{m}] of "
                             "hyper-parameters (key = value lines)")


# ---------------------------------------------------------------------------------------------------------------
# parsing of flag values


_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?)\s*$", re.I)


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (numbers, booleans, lists, inline tables), a fraction such as ``8/255``,
    or else a bare string."""
    m = _FRACTION.match(text)
    if m:
        den = float(m.group(2))
        if den == 0:
            raise BenchError(f"value {text!r} divides by zero")
        return float(m.group(1)) / den
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


MAX_SEEDS = 1000  # seeds one command may ask for


def parse_seeds(text: str | Iterable[int]) -> list[int]:
    if not isinstance(text, str):
        seeds_in = list(text)
        if not seeds_in or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_in):
            raise BenchError(f"malformed seeds {seeds_in!r}; accepted: non-negative integers such as [0, 1, 2]")
        return list(dict.fromkeys(seeds_in))
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)  # ASCII digits only (\d takes '٣' and '３')
        if not m:
            raise BenchError(f"malformed --seeds {text!r}; accepted: non-negative integers such as 0,1,2 or 0-4")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise BenchError(f"malformed --seeds {text!r}: range {part} is empty")
        if b - a + 1 + len(seeds) > MAX_SEEDS:
            raise BenchError(f"--seeds {text!r} is {b - a + 1 + len(seeds)} seeds; accepted: at most {MAX_SEEDS}")
        seeds.extend(range(a, b + 1))
    return list(dict.fromkeys(seeds))


MAX_GRID = 512  # runs one grid may expand into (× seeds × methods); more is almost certainly a typo


@dataclass(frozen=True)
class Grid:
    """The values of one grid axis, from ``--set key=a,b,c`` (a bare comma list; ``[a, b]`` stays one list)."""

    values: tuple[Any, ...]


def _split_grid(item: str, text: str) -> list[str] | None:
    """The parts of a bare comma list (no brackets, braces or quotes at the top level); None if ``text`` is not
    one."""
    if "," not in text or text[:1] in "[{\"'":
        return None
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise BenchError(f"malformed grid in --set {item!r}: an empty value; accepted: comma-separated values "
                         "such as afd.gamma=5,25,50")
    if len(set(parts)) != len(parts):
        dup = next(p for p in parts if parts.count(p) > 1)
        raise BenchError(f"malformed grid in --set {item!r}: {dup!r} appears twice; accepted: distinct values")
    return parts


def parse_sets(items: Iterable[str]) -> list[tuple[str | None, str, Any]]:
    """``--set [method.]key=value`` → (method or None, key, value); ``key=a,b,c`` → a :class:`Grid` value (the
    request expands into one run per grid point, see :func:`expand_grid`)."""
    out = []
    for item in items:
        if "=" not in item:
            raise BenchError(f"malformed --set {item!r}; accepted: key=value or method.key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        method = None
        if "." in key:
            method, key = key.rsplit(".", 1)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or (method is not None and not method):
            raise BenchError(f"malformed --set {item!r}; accepted: key=value or method.key=value")
        if method is not None:
            from methods import METHODS

            method = METHODS.canonical(method)  # --set vaft-d.gamma=... is vaft+d's
        parts = _split_grid(item, value.strip())
        out.append((method, key, Grid(tuple(parse_value(p) for p in parts)) if parts else parse_value(value.strip())))
    return out


def expand_grid(sets: list[tuple[str | None, str, Any]]) -> list[tuple[list[tuple[str | None, str, Any]],
                                                                        dict[str, Any]]]:
    """Every point of the grid the ``--set`` values span: [(plain sets, {"[method.]key": value, ...}), ...], in
    the order the axes were given (the last axis varies fastest). No grid: one point with an empty dict."""
    import itertools

    axes = [(i, s) for i, s in enumerate(sets) if isinstance(s[2], Grid)]
    if not axes:
        return [(list(sets), {})]
    size = math.prod(len(s[2].values) for _, s in axes)
    if size > MAX_GRID:
        raise BenchError(f"the grid of --set values has {size} points; accepted: at most {MAX_GRID}")
    points = []
    for combo in itertools.product(*(s[2].values for _, s in axes)):
        plain = list(sets)
        point = {}
        for (i, (m, k, _)), v in zip(axes, combo):
            plain[i] = (m, k, v)
            point[f"{m}.{k}" if m else k] = v
        points.append((plain, point))
    return points


# ---------------------------------------------------------------------------------------------------------------
# hyper-parameters


def validate_hp(method: str, hp: dict[str, Any], defaults: dict[str, Any]) -> None:
    def num(k):
        v = hp[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BenchError(f"{method}.{k} = {v!r}; accepted: a finite number")
        return v

    for k, v in hp.items():
        d = defaults.get(k)
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            num(k)
        elif isinstance(d, bool) and not isinstance(v, bool):
            raise BenchError(f"{method}.{k} = {v!r}; accepted: true or false")
    if "schedule" in hp:
        from .schedules import check_schedule
        check_schedule(hp["schedule"], f"{method}.schedule")
    if not isinstance(hp["epochs"], int) or hp["epochs"] <= 0:
        raise BenchError(f"{method}.epochs = {hp['epochs']!r}; accepted: a positive integer")
    if not isinstance(hp["batch_size"], int) or hp["batch_size"] <= 1:
        raise BenchError(f"{method}.batch_size = {hp['batch_size']!r}; accepted: an integer ≥ 2")
    for k in ("lr",):
        if num(k) <= 0:
            raise BenchError(f"{method}.{k} = {hp[k]!r}; accepted: a positive number")
    for k in ("momentum", "weight_decay"):
        if not 0 <= num(k) < (1 if k == "momentum" else math.inf):
            raise BenchError(f"{method}.{k} = {hp[k]!r}; accepted: a number in [0, 1)" if k == "momentum"
                             else f"{method}.{k} = {hp[k]!r}; accepted: a non-negative number")
    for k in hp:
        if k == "eps" or k.endswith("_step") or k.endswith("_eps"):
            if not 0 <= num(k) <= 1:
                raise BenchError(f"{method}.{k} = {hp[k]!r}; accepted: a number in [0, 1] (pixel units, "
                                 "e.g. 8/255)")
        if k.endswith("_steps") and (not isinstance(hp[k], int) or hp[k] < 0):
            raise BenchError(f"{method}.{k} = {hp[k]!r}; accepted: a non-negative integer")
    ema = hp.get("ema")
    if ema is not None and (not isinstance(ema, dict) or not 0 < float(ema.get("decay", -1)) < 1):
        raise BenchError(f"{method}.ema = {ema!r}; accepted: none or {{decay = 0.999, warmup = true}}")


def resolve_hp(method: str, preset: dict[str, Any], overrides: dict[str, Any],
               sets: list[tuple[str | None, str, Any]], qualified_only: bool = False) -> dict[str, Any]:
    """Method defaults < preset ``[method.<name>]`` < flag overrides < ``--set``.

    With ``qualified_only`` (the shared pre-training run), only ``--set <method>.key=`` applies, not the plain flags
    meant for the methods being run.
    """
    from methods import get_method

    defaults = get_method(method).resolved_defaults()
    hp = copy.deepcopy(defaults)
    tables = preset.get("method", {})
    # [method."*"] sets keys for every method that has them; [method.<name>] then overrides for that method
    layers = [{k: v for k, v in tables.get("*", {}).items() if k in hp},
              {k: v for k, v in tables.get(method, {}).items() if k not in METHOD_RUN_KEYS}]
    if not qualified_only:
        layers.append({k: v for k, v in overrides.items() if v is not None})
    for layer in layers:
        for k, v in layer.items():
            if k not in hp:
                raise BenchError(f"unknown hyper-parameter {method}.{k}; accepted: {', '.join(sorted(hp))}")
            hp[k] = copy.deepcopy(v)
    for m, k, v in sets:
        if m is not None and m != method:
            continue
        if m is None and qualified_only:
            continue
        if k not in hp:
            if m is None:
                continue  # an unqualified key another method of the command has; checked by check_sets
            raise BenchError(f"unknown hyper-parameter {method}.{k}; accepted: {', '.join(sorted(hp))}")
        hp[k] = v
    if isinstance(hp.get("schedule"), str):
        hp["schedule"] = {"name": hp["schedule"]}
    for k, d in defaults.items():  # `--set afd.gamma=25` is the default 25.0, one run, not a second one
        if isinstance(d, float) and isinstance(hp[k], int) and not isinstance(hp[k], bool):
            hp[k] = float(hp[k])
    validate_hp(method, hp, defaults)
    get_method(method).check_hp(hp)  # the method's own constraints, before anything is trained
    return hp


def check_sets(sets: list[tuple[str | None, str, Any]], methods: list[str]) -> None:
    """Every ``--set`` must name a method of the command (or ``natural`` for pre-training) and a key it has."""
    from methods import METHODS, get_method

    bases = {STARTING_METHOD[METHODS.get(n).starts_from] for n in methods
             if METHODS.get(n).starts_from in STARTING_METHOD}
    for m, k, _ in sets:
        if m is not None:
            if m not in METHODS:
                raise choice_error("method in --set", m, METHODS.names())
            if m not in methods and m not in bases:
                having = [n for n in METHODS.names() if k in get_method(n).resolved_defaults()]
                listed = [n for n in methods if n in having] + sorted(b for b in bases if b in having)
                hint = (f"--set {k}=... (unqualified) applies it to {', '.join(listed)}" if listed else
                        f"{k} is a hyper-parameter of {', '.join(having) or 'no method'}")
                raise BenchError(f"--set {m}.{k}: {m} is not run by this command (methods: {', '.join(methods)}"
                                 f"{'; starting models: ' + ', '.join(sorted(bases)) if bases else ''}); accepted: "
                                 f"add {m} to --methods, or --set for a method that is run ({hint})")
            continue
        if not any(k in get_method(name).resolved_defaults() for name in methods):
            accepted = sorted({key for name in methods for key in get_method(name).resolved_defaults()})
            raise BenchError(f"unknown hyper-parameter {k!r} in --set; accepted for {', '.join(methods)}: "
                             f"{', '.join(accepted)}")


# ---------------------------------------------------------------------------------------------------------------
# the resolved run


def identity_hp(method: str, hp: Any) -> Any:
    """``hp`` as a run's identity counts it: without the hyper-parameters its method added after runs were recorded,
    where they hold the value those runs had (``Method.identity_neutral``), so that those runs keep their hashes (and,
    in ``bench report``, their setting)."""
    from methods import METHODS

    neutral = METHODS.get(method).identity_neutral if method in METHODS else {}
    if not neutral or not isinstance(hp, dict):
        return hp
    return {k: v for k, v in hp.items() if not (k in neutral and v == neutral[k])}


@dataclass
class RunConfig:
    method: str
    dataset: str
    arch: str
    seed: int
    hp: dict[str, Any]
    preset: str | None = None
    subset: int | None = None
    normalize: bool = False
    precision: str = "fp32"
    pretrained: str | None = None  # a run name (suite-trained) or "file:<sha256>" of --pretrained
    pretrained_path: str | None = None
    # "file:<sha256>" of a pre-trained backbone (--pretrained of a timm: arch with an ImageNet head) the run's model
    # starts from, its classifier new: the natural / PGD-AT base runs and the from-scratch methods; part of the
    # identity only when set
    init: str | None = None
    init_path: str | None = None
    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20", "aa"])
    eval_n: int | None = None
    aa_n: int | None = None
    probe_n: int = 256
    eval_batch_size: int = 256
    aa_chunk: int = 1000  # AutoAttack is run and saved in chunks of this many images (resume granularity)
    # the last `holdout` images of every class are kept out of training (set on the PGD-AT base of RiFT, so that
    # RiFT's held-out slice is unseen by its starting model too); part of the identity only when set
    holdout: int | None = None
    # under data parallelism without synchronised BatchNorm: the number of ranks whose batches BN normalises
    # separately (the trained weights depend on it); None whenever BN sees the whole global batch, as on one process
    bn_ranks: int | None = None
    # the fingerprint of the decoded dataset (bench.data.Dataset.fingerprint): the data the run learns from and is
    # evaluated on, by content. Set by every plan; None only in records older than it (they keep their hashes)
    data: str | None = None
    # below: how to run, not what is run (not part of the run's identity)
    device: str = "cpu"
    channels_last: bool = False
    compile: bool = False
    data_dir: str | None = None
    results_dir: str = "results"
    download: bool = False
    world_size: int = 1  # processes training the run (DDP); with sync_bn the run is the same as on one process
    sync_bn: bool = True

    IDENTITY = ("method", "dataset", "arch", "seed", "hp", "subset", "normalize", "precision", "pretrained")

    def __post_init__(self) -> None:
        from methods import METHODS

        self.method = METHODS.canonical(self.method)  # an alias (vaft-d) is its method's run (vaft+d), same hash

    OPTIONAL_IDENTITY = ("holdout", "bn_ranks", "data", "init")  # in the identity only when set: older runs keep their hashes

    def identity(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.IDENTITY}
        out["hp"] = identity_hp(self.method, self.hp)
        out.update({k: getattr(self, k) for k in self.OPTIONAL_IDENTITY if getattr(self, k) is not None})
        return out

    @property
    def run_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def run_name(self) -> str:
        arch = self.arch.replace(":", "-").replace("@", "-r")  # timm:vit_tiny_patch16_224@32 → timm-vit_…-r32
        return f"{self.dataset}_{arch}_{self.method}_s{self.seed}_{self.run_hash}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
