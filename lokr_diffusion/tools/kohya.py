"""`lokr-diffusion import-kohya`: a kohya sd-scripts training setup as this project's TOML config.

A kohya user brings a training TOML (`--config_file`: flat keys, or grouped in sections, which
sd-scripts flattens), or the command line they ran, and often a `dataset_config.toml`. Every option
goes through the one table in `kohya_options`; the result is a config that `load_config` accepts
(checked before it is written) and a report that says, for each option, whether it was mapped, mapped
with a different meaning (and how), or dropped (and why). kohya's defaults that differ from this
project's and change the run (alpha 1, bucketing off, `.caption` files, ...) are written out
explicitly and reported as such, so the imported run trains what the kohya run trained.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from ..schema import read_toml_file
from .kohya_write import toml_value
from .kohya_options import (ARGS, CHANGED, DATASET, DROPPED, KOHYA_DEFAULTS, MAPPED, NETWORK, Outcome, Rule,
                            as_bool, as_float, as_str, parse_key_values, rule_index, target_exists)

SECTION_ORDER = ("model", "network", "train", "output", "sample", "logging", "validation")
_INDEX = rule_index()
# kohya script -> family (None: SD 1.x or 2.x, told apart by --v2)
_SCRIPTS = {"train_network.py": None, "sdxl_train_network.py": "sdxl", "flux_train_network.py": "flux",
            "sd3_train_network.py": "sd35-large"}
_NETWORK_FAMILY = {"networks.lora_flux": "flux", "networks.lora_sd3": "sd35-large"}
_FLUX_ONLY = ("ae", "timestep_sampling", "discrete_flow_shift", "model_prediction_type", "guidance_scale",
              "apply_t5_attn_mask", "split_mode", "sigmoid_scale")
_SD3_ONLY = ("clip_g", "training_shift", "apply_lg_attn_mask", "enable_scaled_pos_embed")
_FLOW_FAMILIES = ("flux", "flux-schnell", "sd35-large", "sd35-medium")
_KOHYA_LORA = ("networks.lora", "networks.lora_flux", "networks.lora_sd3")
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ReportLine:
    """One kohya option (or a kohya default written out) and what became of it."""

    option: str
    origin: str
    value: Any
    status: str
    targets: dict[str, Any]
    note: str
    pending: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"option": self.option, "origin": self.origin, "value": self.value, "status": self.status,
                "targets": self.targets, "note": self.note, "pending": self.pending}


@dataclass
class KohyaImport:
    """The converted config (`config`, TOML-ready) and the report lines."""

    config: dict[str, Any]
    lines: list[ReportLine]
    family: str
    family_reason: str
    sources: list[str]

    def counts(self) -> dict[str, int]:
        out = {MAPPED: 0, CHANGED: 0, DROPPED: 0}
        for line in self.lines:
            out[line.status] += 1
        return out

    def line(self, option: str, origin: str | None = None) -> ReportLine:
        """The report line of `option` (the first, or the one from `origin`)."""
        for line in self.lines:
            if line.option == option and (origin is None or line.origin == origin):
                return line
        raise KeyError(option)


# -- reading kohya's inputs -----------------------------------------------------------------------

def flatten_kohya_toml(raw: Mapping[str, Any], name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """sd-scripts' `--config_file`: top-level keys, and the keys of each top-level table (any section
    names) as if they were top-level. Returns (options, option -> where it was read)."""
    options: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                options[inner] = inner_value
                origins[inner] = f"{name} [{key}]"
        else:
            options[key] = value
            origins[key] = name
    return options, origins


def parse_kohya_argv(argv: Sequence[str]) -> tuple[str | None, dict[str, Any], list[str]]:
    """A kohya command line -> (script, options, launcher words that were skipped).

    Words up to the script (`accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py`)
    are the launcher's; a bare argument list works too. `--key v`, `--key=v`, a flag alone (true),
    and several values (`--network_args "algo=lokr" "factor=8"`) become a list.
    """
    words = list(argv)
    script = None
    launcher: list[str] = []
    for i, word in enumerate(words):
        if word.endswith(".py"):
            script, launcher, words = word, words[:i], words[i + 1:]
            break
    options: dict[str, Any] = {}
    key = None
    for word in words:
        if word.startswith("--") and len(word) > 2:
            name, sep, value = word[2:].partition("=")
            key = name.replace("-", "_")
            options[key] = value if sep else []
            if sep:
                key = None
            continue
        if key is None:
            raise ConfigError(f"kohya command line: {word!r} is not an option's value (expected --option value)")
        options[key].append(word)
    for name, value in options.items():
        if isinstance(value, list):
            options[name] = True if not value else (value[0] if len(value) == 1 else value)
    return script, options, launcher


# -- the import -----------------------------------------------------------------------------------

class Importer:
    """Runs every kohya option through the table; the converters call back into it for what needs
    the whole setup (paths, datasets, the family, the network module)."""

    def __init__(self, args: dict[str, Any], origins: dict[str, str], script: str | None, base_dir: Path,
                 family: str | None, dataset_config: Path | None) -> None:
        self.args = args
        self.origins = origins
        self.script = script
        self.base_dir = base_dir
        self.out: dict[str, dict[str, Any]] = {name: {} for name in SECTION_ORDER}
        self.data_defaults: dict[str, Any] = {}
        self.folder_entries: list[dict[str, Any]] = []
        self.dataset_entries: list[dict[str, Any]] | None = None
        self.lines: list[ReportLine] = []
        self.current = "kohya config"
        self.current_option = ""
        self.network_module: str | None = None
        self.batch_sizes: list[int] = []
        self.dataset_config = dataset_config
        if dataset_config is None and "dataset_config" in args:
            self.dataset_config = Path(self.path(as_str(args["dataset_config"], self)))
        self.dataset_raw = read_toml_file(self.dataset_config, "dataset config", ConfigError) if self.dataset_config else {}
        self.family, self.family_reason = self._detect_family(family)
        self._flow: dict[str, Outcome] | None = None

    # paths ----------------------------------------------------------------------------------------
    def path(self, text: str) -> str:
        """kohya reads relative paths from the folder it runs in (`base_dir` here); the config gets
        absolute ones so it works from anywhere. Windows paths are kept as written."""
        if _WINDOWS_PATH.match(text) and os.name != "nt":
            return text
        path = Path(text).expanduser()
        return (path if path.is_absolute() else Path(os.path.abspath(self.base_dir / path))).as_posix()

    def model_path(self, text: str) -> str:
        """A local path made absolute; a hub id (`owner/name` that is not a local path) as written."""
        local = Path(text).expanduser()
        if not local.is_absolute() and not (self.base_dir / local).exists() and _HUB_ID.match(text) \
                and not text.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            return text
        return self.path(text)

    # family ---------------------------------------------------------------------------------------
    def _detect_family(self, override: str | None) -> tuple[str, str]:
        from ..training.config import FAMILIES

        if override:
            if override not in FAMILIES:
                raise ConfigError(f"--family {override!r}: expected one of {', '.join(FAMILIES)}")
            return override, "given with --family"
        model = str(self.args.get("pretrained_model_name_or_path", "")).lower()
        name = Path(model.replace("\\", "/")).name
        v2 = as_bool(self.args.get("v2", False), self)
        script = Path(self.script).name if self.script else None
        if script in _SCRIPTS:
            family = _SCRIPTS[script] or ("sd2" if v2 else "sd1")
            return self._refine(family, name), f"from the script name {script}" + (" and v2" if v2 else "")
        module = str(self.args.get("network_module", ""))
        if module in _NETWORK_FAMILY:
            return self._refine(_NETWORK_FAMILY[module], name), f"from network_module = {module}"
        if v2:
            return "sd2", "from v2 = true"
        for key in _SD3_ONLY:
            if key in self.args:
                return self._refine("sd35-large", name), f"from the SD3-only option {key}"
        for key in _FLUX_ONLY:
            if key in self.args:
                return self._refine("flux", name), f"from the Flux.1-only option {key}"
        if "schnell" in name:
            return "flux-schnell", "from the model name"
        if "flux" in name:
            return "flux", "from the model name"
        if re.search(r"sd3|stable-diffusion-3", name):
            return self._refine("sd35-large", name), "from the model name"
        if re.search(r"(^|[^a-z])(sdxl|xl)([^a-z]|$)|stable-diffusion-xl", name):
            return "sdxl", "from the model name"
        return "auto", ("not told by the options (give the script name or --family); the trainer reads it "
                        "from the model")

    @staticmethod
    def _refine(family: str, name: str) -> str:
        if family == "flux" and "schnell" in name:
            return "flux-schnell"
        if family == "sd35-large" and "medium" in name:
            return "sd35-medium"
        return family

    @property
    def flow_family(self) -> bool:
        return self.family in _FLOW_FAMILIES

    # recording ------------------------------------------------------------------------------------
    def _record(self, option: str, origin: str, value: Any, rule: Rule | None, result: Any,
                scope: dict[str, Any] | None) -> ReportLine:
        """Apply one converted value: write the keys this version has, report the rest as pending."""
        if rule is None:
            line = ReportLine(option, origin, value, DROPPED, {}, "not a kohya option this importer knows")
            self.lines.append(line)
            return line
        outcome = result if isinstance(result, Outcome) else Outcome({rule.target: result})
        status = outcome.status or rule.status
        note = outcome.note if outcome.note is not None else rule.note
        written: dict[str, Any] = {}
        pending = []
        if status != DROPPED:
            for target, val in outcome.values.items():
                if not target_exists(target):
                    pending.append(target)
                    continue
                section, _, key = target.partition(".")
                (scope if section == "data" and scope is not None else
                 self.data_defaults if section == "data" else self.out[section])[key] = val
                written[target] = val
            if pending and not written:
                status = DROPPED
                note = (f"needs {', '.join(f'`{t}`' for t in pending)}, which this version does not have yet"
                        + (f" ({note})" if note else ""))
            elif pending:
                status = CHANGED
                missing = ", ".join(f"`{t} = {toml_value(outcome.values[t])}`" for t in pending)
                note = f"{note}; not written: {missing} (not in this version yet)".lstrip("; ")
        if os.name != "nt" and any(isinstance(v, str) and _WINDOWS_PATH.match(v) for v in written.values()):
            note = "a Windows path, kept as written: change it to this machine's path" + (f"; {note}" if note else "")
        line = ReportLine(option, origin, value, status, written, note, pending)
        self.lines.append(line)
        return line

    def apply(self, option: str, value: Any, origin: str, sources: tuple[str, ...],
              scope: dict[str, Any] | None = None) -> ReportLine:
        rule = next((_INDEX[(s, option)] for s in sources if (s, option) in _INDEX), None)
        self.current, self.current_option = f"{origin}: {option}", option
        if rule is None:
            return self._record(option, origin, value, None, None, scope)
        if rule.target and rule.target.startswith("train.") and rule.status != DROPPED:
            from ..training.objective import FLOW_ONLY, NOISE_ONLY

            key = rule.target.partition(".")[2]
            if self.flow_family and key in NOISE_ONLY:
                return self._record(option, origin, value, rule,
                                    Outcome(status=DROPPED, note=f"{self.family} trains by flow matching: "
                                                                 f"{NOISE_ONLY[key]}"), scope)
            if self.family != "auto" and not self.flow_family and key in FLOW_ONLY:
                return self._record(option, origin, value, rule,
                                    Outcome(status=DROPPED, note=f"flow matching only; {self.family} is a UNet "
                                                                 "family"), scope)
        result = rule.convert(value, self) if rule.convert is not None else Outcome()
        return self._record(option, origin, value, rule, result, scope)

    def default(self, option: str, target: str, value: Any, why: str, scope: dict[str, Any] | None = None) -> None:
        self._record(option, "kohya default", value, Rule(option, ARGS, target, MAPPED, why),
                     Outcome({target: value}, note=why), scope)

    # callbacks of the converters ------------------------------------------------------------------
    def add_folder_dataset(self, folder: str, is_reg: bool) -> Outcome:
        if self.dataset_config is not None:
            return Outcome(status=DROPPED, note="kohya ignores it when dataset_config is given")
        entry: dict[str, Any] = {"dir": self.path(folder)}
        if is_reg:
            entry["is_reg"] = True
        self.folder_entries.append(entry)
        return Outcome(note=f"`[[data.datasets]] dir = \"{entry['dir']}\"`" + (", `is_reg = true`" if is_reg else ""))

    def dataset_config_option(self, path: str) -> Outcome:
        return Outcome(note=f"read {self.dataset_config}; each subset is one `[[data.datasets]]` (below)")

    def dataset_batch_size(self, size: int) -> Outcome:
        self.batch_sizes.append(size)
        if "train_batch_size" in self.args:
            return Outcome(status=DROPPED, note="train_batch_size is set and applies to every dataset here")
        first = self.batch_sizes[0]
        if size != first:
            return Outcome(status=CHANGED, note=f"one batch size for the run: the first dataset's, {first}")
        return Outcome({"train.batch_size": size})

    def sample_prompts(self, path: str) -> Outcome:
        file = Path(self.path(path))
        if target_exists("sample.prompt_file"):
            return Outcome({"sample.prompt_file": file.as_posix()})
        if file.suffix.lower() == ".txt" and file.is_file():
            text = file.read_text(encoding="utf-8", errors="replace")
            prompts = [line.split(" --")[0].strip() for line in text.splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
            prompts = [p for p in prompts if p]
            if prompts:
                return Outcome({"sample.prompts": prompts}, CHANGED,
                               f"the {len(prompts)} prompts of {file.name} are copied into `sample.prompts`; their "
                               "per-prompt options (--n, --w, --h, --s, --l, --d) are not (this version has no "
                               "`sample.prompt_file`)")
        return Outcome(status=DROPPED, note=f"needs `sample.prompt_file` (not in this version yet) to read {file}")

    def network_module_option(self, module: str) -> Outcome:
        self.network_module = module
        if module == "lycoris.kohya":
            return Outcome(status=CHANGED, note="LyCORIS: `algo` and `preset` come from network_args (LyCORIS "
                                                "defaults: lora, full); text-encoder adapters cover the attention "
                                                "projections only (LyCORIS: also the MLPs)")
        if module in _KOHYA_LORA:
            return Outcome({"network.algo": "lora", "network.preset": "attn-mlp"}, CHANGED,
                           "kohya LoRA: attention and MLP layers (`attn-mlp`), with conv_dim also the ResNet and "
                           "sampler convs (`full`, which on SD 1.x/2.x also adds conv_in/conv_out and the time "
                           "embedding); text-encoder adapters cover the attention projections only (kohya: also "
                           "the MLPs)")
        raise ConfigError(f"{self.current}: {module!r} cannot be imported: this project trains lycoris.kohya "
                          "(lokr, loha, lora/locon) and networks.lora (and its _flux / _sd3 variants)")

    def network_args_option(self, value: Any) -> Outcome:
        items = parse_key_values(value, self)
        origin = f"network_args ({self.origins.get('network_args', 'config')})"
        for key, text in items.items():
            self.apply(key, text, origin, (NETWORK,))
        return Outcome(note=f"{len(items)} item(s), each reported on its own line (origin network_args)")

    def flow_option(self) -> Outcome:
        """The timestep options kohya splits over several flags, read together once; each option's
        line shows the part it decided."""
        if self._flow is None:
            self._flow = self._flow_mapping()
        return self._flow.get(self.current_option, Outcome(note="read with the other timestep options"))

    def _flow_mapping(self) -> dict[str, Outcome]:
        a = self.args
        out: dict[str, Outcome] = {}
        scheme = as_str(a.get("weighting_scheme", "uniform"), self).lower()
        density = {"uniform": "uniform", "none": "uniform", "logit_normal": "logit_normal", "mode": "mode",
                   "cosmap": "cosmap", "sigma_sqrt": "uniform"}.get(scheme)
        if density is None:
            raise ConfigError(f"weighting_scheme: {scheme!r} is none of uniform, none, logit_normal, mode, cosmap, "
                              "sigma_sqrt")
        weighting = scheme if scheme in ("sigma_sqrt", "cosmap") else None
        if self.family.startswith("sd35"):
            shift = as_float(a.get("training_shift", 1.0), self)
            values = {"train.timestep_sampling": density, "train.shift": shift}
            if weighting:
                values["train.loss_weighting"] = weighting
            how = f"shifted by training_shift ({shift})" if "training_shift" in a else \
                "no shift (kohya's training_shift default 1.0; this project's SD3 default is 3.0)"
            out["weighting_scheme"] = Outcome(values, CHANGED, f"density {density}"
                                              + (f" and loss weight {weighting}" if weighting else "") + f", {how}")
            out["training_shift"] = Outcome({"train.shift": shift}, MAPPED, "a fixed shift of the positions")
            return out
        sampling = as_str(a.get("timestep_sampling", "sigma"), self).lower()
        scale = as_float(a.get("sigmoid_scale", 1.0), self)
        flow_shift = as_float(a.get("discrete_flow_shift", 3.0), self)
        if sampling == "uniform":
            values, note = {"train.timestep_sampling": "uniform", "train.shift": 1.0}, "uniform, no shift"
        elif sampling == "sigmoid":
            values = {"train.timestep_sampling": "logit_normal", "train.logit_mean": 0.0, "train.logit_std": scale,
                      "train.shift": 1.0}
            note = "sigmoid of a normal draw = `logit_normal` with std sigmoid_scale, no shift"
        elif sampling == "shift":
            values = {"train.timestep_sampling": "logit_normal", "train.logit_mean": 0.0, "train.logit_std": scale,
                      "train.shift": flow_shift}
            note = "`logit_normal` with std sigmoid_scale, shifted by discrete_flow_shift"
        elif sampling == "flux_shift":
            values = {"train.timestep_sampling": "logit_normal", "train.logit_mean": 0.0, "train.logit_std": scale}
            note = "`logit_normal` with std sigmoid_scale and the resolution-dependent shift (the default here)"
        elif sampling == "sigma":
            values = {"train.timestep_sampling": density, "train.shift": flow_shift}
            note = (f"kohya's `sigma`: density from weighting_scheme ({scheme}), shifted by discrete_flow_shift "
                    f"({flow_shift})")
        else:
            raise ConfigError(f"timestep_sampling: {sampling!r} is none of sigma, uniform, sigmoid, shift, flux_shift")
        # the same densities under other names; kohya's `sigma` picks from the scheduler's 1000 discrete steps
        out["timestep_sampling"] = Outcome(values, CHANGED if sampling == "sigma" else MAPPED, note)
        out["sigmoid_scale"] = Outcome({"train.logit_std": scale} if "train.logit_std" in values else {},
                                       CHANGED if "train.logit_std" in values else DROPPED,
                                       "the std of `logit_normal`" if "train.logit_std" in values
                                       else f"not used with timestep_sampling = {sampling}")
        shifted = values.get("train.shift") == flow_shift and sampling in ("shift", "sigma")
        out["discrete_flow_shift"] = Outcome({"train.shift": flow_shift} if shifted else {},
                                             MAPPED if shifted else DROPPED,
                                             "a fixed shift of the positions" if shifted
                                             else f"not used with timestep_sampling = {sampling}")
        prediction = as_str(a.get("model_prediction_type", "sigma_scaled"), self).lower()
        if sampling == "sigma" or prediction == "sigma_scaled":
            out["weighting_scheme"] = Outcome({"train.timestep_sampling": density} if sampling == "sigma" else {},
                                              CHANGED, f"the density of the positions ({density})"
                                              + (" and the loss weight" if weighting else ""))
        else:
            out["weighting_scheme"] = Outcome(status=DROPPED, note=f"not used with timestep_sampling = {sampling}")
        if prediction == "raw":
            out["model_prediction_type"] = Outcome(status=MAPPED, note="raw: the prediction is used as is, as here")
        else:
            values = {"train.loss_weighting": weighting} if weighting and prediction == "sigma_scaled" else {}
            out["model_prediction_type"] = Outcome(
                values, CHANGED, f"{prediction}: here the prediction is used as is (kohya's `raw`), the target "
                                 "being noise - latents" + ("; the weighting_scheme loss weight is kept" if values
                                                            else ""))
        return out

    # running --------------------------------------------------------------------------------------
    def run(self) -> None:
        for option, value in self.args.items():
            self.apply(option, value, self.origins.get(option, "config"), (ARGS, DATASET))
        if self.dataset_config is not None:
            self._read_dataset_config(self.dataset_config)
        self._finish_network()
        self._finish_defaults()
        self._finish_flow()
        self._finish_sample()

    def uses(self, option: str) -> bool:
        """Whether `option` is set anywhere: the training options or any dataset_config table."""
        if option in self.args or option in self.dataset_raw.get("general", {}):
            return True
        datasets = self.dataset_raw.get("datasets", [])
        tables = [d for d in datasets if isinstance(d, dict)]
        tables += [s for d in tables for s in d.get("subsets", []) if isinstance(s, dict)]
        return any(option in t for t in tables)

    def _read_dataset_config(self, path: Path) -> None:
        raw = self.dataset_raw
        name = path.name
        general = raw.get("general", {})
        datasets = raw.get("datasets", [])
        for key in raw:
            if key not in ("general", "datasets"):
                self._record(key, name, raw[key], None, None, None)
        if not isinstance(general, dict) or not isinstance(datasets, list):
            raise ConfigError(f"{path}: expected a [general] table and [[datasets]] tables")

        def convert(table: Mapping[str, Any], origin: str) -> dict[str, Any]:
            scope: dict[str, Any] = {}
            for key, value in table.items():
                if key != "subsets":
                    self.apply(key, value, origin, (DATASET,), scope)
            return scope

        common = convert(general, f"{name} [general]")
        entries = []
        for i, dataset in enumerate(datasets, 1):
            if not isinstance(dataset, dict):
                raise ConfigError(f"{path}: [[datasets]] #{i} is not a table")
            level = convert(dataset, f"{name} [[datasets]] #{i}")
            subsets = dataset.get("subsets", [])
            if not isinstance(subsets, list) or not subsets:
                raise ConfigError(f"{path}: [[datasets]] #{i} has no [[datasets.subsets]]")
            for j, subset in enumerate(subsets, 1):
                origin = f"{name} [[datasets]] #{i} [[subsets]] #{j}"
                own = convert(subset, origin)
                entry = {**common, **level, **own}
                if "dir" not in entry:
                    self.lines.append(ReportLine("(subset)", origin, None, DROPPED, {},
                                                 "no image_dir: kohya's metadata_file subsets are not read; this "
                                                 "subset is left out"))
                    continue
                entries.append(entry)
        self.dataset_entries = entries

    def _finish_network(self) -> None:
        net = self.out["network"]
        if self.network_module is None:
            self.network_module = "networks.lora"
            self._record("network_module", "kohya default", "networks.lora", _INDEX[(ARGS, "network_module")],
                         self.network_module_option("networks.lora"), None)
            self.lines[-1].note = "not given (kohya requires it): taken as networks.lora; " + self.lines[-1].note
        if self.network_module == "lycoris.kohya":
            if "algo" not in net:
                self.default("algo", "network.algo", "lora", "LyCORIS's default algorithm is lora")
            if "preset" not in net:
                self.default("preset", "network.preset", "full", "LyCORIS's default preset is full (here: attn-mlp)")
        for option, (target, value, why) in KOHYA_DEFAULTS.items():
            section, _, key = target.partition(".")
            if section == "network" and option not in self.args and key not in net:
                self.default(option, target, value, why)
        full_lin = any(line.option == "preset" and line.value == "full-lin" for line in self.lines)
        if full_lin and "conv_dim" in net:
            for key in ("conv_dim", "conv_alpha"):
                net.pop(key, None)
            for line in self.lines:
                if line.option in ("conv_dim", "conv_alpha") and line.targets:
                    line.status, line.targets = DROPPED, {}
                    line.note = "preset full-lin leaves the k x k convs out"
        if self.network_module == "lycoris.kohya" and net.get("preset") == "full" and "conv_dim" not in net \
                and not full_lin:
            self.default("conv_dim", "network.conv_dim", net["dim"],
                         "LyCORIS trains k x k convs at network_dim unless conv_dim is given (here only with "
                         "conv_dim)")
        if "conv_dim" in net and "conv_alpha" not in net:
            self.default("conv_alpha", "network.conv_alpha", net["alpha"],
                         "conv_alpha defaults to network_alpha in kohya and LyCORIS (here: = conv_dim)")
        if self.network_module in _KOHYA_LORA and "conv_dim" in net:
            net["preset"] = "full"
            self.lines.append(ReportLine("conv_dim", "network_args", net["conv_dim"], CHANGED,
                                         {"network.preset": "full"},
                                         "kohya LoRA with conv_dim also adapts the 3x3 convs: `preset = \"full\"`"))
        if "train_text_encoder" not in net:
            self.default("network_train_unet_only", "network.train_text_encoder", True,
                         "kohya trains text-encoder adapters unless network_train_unet_only (here: off)")

    def _finish_defaults(self) -> None:
        entries = self.dataset_entries if self.dataset_entries is not None else self.folder_entries
        for option, (target, value, why) in KOHYA_DEFAULTS.items():
            section, _, key = target.partition(".")
            if section == "network" or option in self.args:
                continue
            if section == "data":  # under [data], for every dataset that does not set it
                if not entries or not all(key in e for e in entries):
                    self.default(option, target, value, why)
            elif key not in self.out[section]:
                if option == "max_train_steps" and "epochs" in self.out["train"]:
                    continue
                self.default(option, target, value, why)
        if self.family == "flux" and "guidance" not in self.out["train"]:
            self.default("guidance_scale", "train.guidance", 3.5, "kohya's Flux.1 guidance default is 3.5 (here 1.0)")

    def _finish_flow(self) -> None:
        """A Flux.1 / SD3 run without any timestep option still samples as kohya does by default."""
        if not self.flow_family or self._flow is not None:
            return
        self._flow = self._flow_mapping()
        first = "weighting_scheme" if self.family.startswith("sd35") else "timestep_sampling"
        outcome = self._flow[first]
        self._record(first, "kohya default", None, Rule(first, ARGS, None, CHANGED, ""),
                     Outcome(outcome.values, CHANGED, "kohya's default timesteps: " + (outcome.note or "")), None)

    def _finish_sample(self) -> None:
        sample = self.out["sample"]
        if "every_steps" in sample and not (sample.get("prompts") or sample.get("prompt_file")):
            del sample["every_steps"]
            line = next(x for x in self.lines if x.option == "sample_every_n_steps")
            line.status, line.targets = DROPPED, {}
            line.note = "no sample prompts could be imported, so nothing to sample"

    # result ---------------------------------------------------------------------------------------
    def datasets(self) -> dict[str, Any]:
        """The `[data]` table: values shared by every entry under [data], the rest per entry."""
        own = self.dataset_entries if self.dataset_entries is not None else self.folder_entries
        entries = [{**self.data_defaults, **e} for e in own]
        if not entries:
            return {}
        shared = {key: value for key, value in entries[0].items()
                  if key not in ("dir", "is_reg", "class_token") and all(e.get(key) == value for e in entries)}
        datasets = [{k: v for k, v in e.items() if k not in shared} for e in entries]
        return {**shared, "datasets": datasets}

    def config(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.family != "auto":
            self.out["model"].setdefault("family", self.family)
        for name in SECTION_ORDER:
            if self.out[name]:
                doc[name] = dict(self.out[name])
        data = self.datasets()
        if data:
            doc["data"] = data
        return doc


def import_kohya(config: str | Path | None = None, argv: Sequence[str] = (), dataset_config: str | Path | None = None,
                 family: str | None = None, script: str | None = None,
                 kohya_dir: str | Path | None = None) -> KohyaImport:
    """Convert a kohya setup: a training TOML (`config`), a command line (`argv`, which wins over the
    TOML as in kohya), and a `dataset_config.toml` (or the one the options name).

    `kohya_dir` is the folder kohya ran in, which its relative paths are relative to (default: the
    current folder). `script` (e.g. `sdxl_train_network.py`) and `family` pick the model family where
    the options cannot tell. Raises ConfigError for what cannot be imported at all (another
    algorithm, a network module other than LoRA / LyCORIS, a malformed value).
    """
    args: dict[str, Any] = {}
    origins: dict[str, str] = {}
    sources = []
    base = Path(kohya_dir) if kohya_dir is not None else Path.cwd()
    argv_script, argv_options, launcher = parse_kohya_argv(argv) if argv else (None, {}, [])
    config_path = Path(config) if config is not None else None
    if config_path is None and "config_file" in argv_options:
        config_path = Path(str(argv_options["config_file"]))
        if not config_path.is_absolute():
            config_path = base / config_path
        if config_path.suffix != ".toml":
            config_path = config_path.with_name(config_path.name + ".toml")
    if config_path is not None:
        options, where = flatten_kohya_toml(read_toml_file(config_path, "kohya config", ConfigError), config_path.name)
        args.update(options)
        origins.update(where)
        sources.append(str(config_path))
    if argv:
        argv_options.pop("config_file", None)
        args.update(argv_options)
        origins.update({k: "command line" for k in argv_options})
        sources.append("command line")
    if not args:
        raise ConfigError("import-kohya: give a kohya config TOML, a kohya command line after `--`, or both")
    importer = Importer(args, origins, script or argv_script, base, family,
                        Path(dataset_config) if dataset_config is not None else None)
    if launcher:
        importer.lines.append(ReportLine("(launcher)", "command line", " ".join(launcher), DROPPED, {},
                                         "the launcher's words (accelerate launch and its options) are not training "
                                         "options: use `accelerate launch` as before"))
    importer.run()
    if importer.dataset_config is not None:
        sources.append(str(importer.dataset_config))
    return KohyaImport(importer.config(), importer.lines, importer.family, importer.family_reason, sources)
