"""Muon for hidden weight matrices and AdamW for everything else, in one ``torch.optim.Optimizer``.

Hidden 2-D matrices (and each expert of a stacked 3-D MoE weight, each block of a fused QKV / gate-up projection)
are updated with Nesterov momentum orthogonalised by Newton-Schulz (:mod:`.newton_schulz`), scaled by the
"original" ``sqrt(max(1, rows/cols))`` or Moonlight's "match_rms_adamw" ``0.2 * sqrt(max(rows, cols))`` rule, with
decoupled weight decay. Embeddings, the output head (tied or not), norms, biases, MoE router weights and every other
non-matrix parameter get AdamW. Matrices of the same shape are orthogonalised together in one batched chain; under
DDP each rank orthogonalises a share of them and the results are all-gathered; FSDP2 / DTensor parameters are
assembled to full matrices before Newton-Schulz and only the local shard of the result is applied.

``import hf_effllm`` makes ``TrainingArguments(optim="muon")`` work, with options in ``optim_args``.

Example:
    >>> import hf_effllm
    >>> args = TrainingArguments("out", optim="muon", learning_rate=2e-3,
    ...                          optim_args="momentum=0.95,adjust_lr=match_rms_adamw")  # doctest: +SKIP
    >>> opt = hf_effllm.Muon.from_model(model, lr=2e-3, weight_decay=0.1)  # the same optimizer, without Trainer
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HfEffllmError
from .newton_schulz import NS_COEFFICIENTS, newton_schulz

logger = logging.getLogger(__name__)

ADJUST_LR_CHOICES = ("match_rms_adamw", "original", "none")
_ROUTER_MODULE_NAMES = frozenset({"gate", "router", "shared_expert_gate", "switch_gate", "gating"})
_HEAD_MODULE_NAMES = frozenset({"lm_head", "score", "classifier", "embed_out"})
_NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class MuonConfig:
    """Options of :class:`Muon` (also the keys accepted in ``TrainingArguments.optim_args``).

    The learning rate and weight decay of the Muon matrices are the Trainer's ``learning_rate`` / ``weight_decay``
    (or ``lr`` / ``weight_decay`` of :meth:`Muon.from_model`); AdamW's betas and epsilon default to the Trainer's
    ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``.

    Example:
        >>> MuonConfig.from_optim_args("momentum=0.9,ns_steps=6,adjust_lr=original,adamw_lr=3e-4")
    """

    momentum: float = field(default=0.95, metadata={"help": "Muon momentum (0 <= momentum < 1)."})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum for the Muon matrices."})
    ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations (1..99)."})
    ns_coefficients: tuple[float, float, float] = field(
        default=NS_COEFFICIENTS, metadata={"help": "Quintic coefficients (a, b, c); not settable from optim_args."}
    )
    ns_dtype: str = field(default="bfloat16", metadata={"help": "Newton-Schulz compute dtype: bfloat16 or float32."})
    eps: float = field(default=1e-7, metadata={"help": "Norm floor of the Newton-Schulz normalisation."})
    adjust_lr: str = field(
        default="match_rms_adamw",
        metadata={
            "help": "Per-matrix learning-rate scale: match_rms_adamw (0.2*sqrt(max(rows, cols)), reuse an AdamW lr), "
            "original (sqrt(max(1, rows/cols)), use a Muon lr such as 0.02) or none."
        },
    )
    adamw_lr: float | None = field(
        default=None,
        metadata={"help": "AdamW learning rate; None = the Muon learning rate (right for match_rms_adamw)."},
    )
    adamw_weight_decay: float | None = field(
        default=None, metadata={"help": "AdamW weight decay of matrices (embeddings, head); None = the Muon one."}
    )
    adamw_beta1: float | None = field(default=None, metadata={"help": "AdamW beta1; None = Trainer's adam_beta1."})
    adamw_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2; None = Trainer's adam_beta2."})
    adamw_eps: float | None = field(default=None, metadata={"help": "AdamW epsilon; None = Trainer's adam_epsilon."})
    split_fused: bool = field(
        default=True, metadata={"help": "Orthogonalise each block of fused QKV / gate-up projections separately."}
    )
    distributed: str = field(
        default="auto",
        metadata={
            "help": "auto: under torch.distributed each rank orthogonalises a share of the matrices and the results "
            "are all-gathered; off: every rank does all of them (needed when ranks hold different parameters, "
            "e.g. pipeline parallelism)."
        },
    )
    compile: str = field(
        default="auto", metadata={"help": "torch.compile the Newton-Schulz chain: auto (on CUDA only), true, false."}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise HfEffllmError(f"momentum={self.momentum} is out of range; use 0 <= momentum < 1 (e.g. 0.95).")
        if not 1 <= self.ns_steps < 100:
            raise HfEffllmError(f"ns_steps={self.ns_steps} is out of range; use 1..99 (Muon uses 5).")
        if len(self.ns_coefficients) != 3:
            raise HfEffllmError(f"ns_coefficients={self.ns_coefficients!r} must be three floats (a, b, c).")
        self.ns_coefficients = tuple(float(c) for c in self.ns_coefficients)  # type: ignore[assignment]
        if self.ns_dtype not in _NS_DTYPES:
            raise HfEffllmError(f"ns_dtype={self.ns_dtype!r} is not supported; use one of {list(_NS_DTYPES)}.")
        if not self.eps > 0:
            raise HfEffllmError(f"eps={self.eps} must be > 0 (e.g. 1e-7).")
        if self.adjust_lr not in ADJUST_LR_CHOICES:
            raise HfEffllmError(f"adjust_lr={self.adjust_lr!r} is not supported; use one of {list(ADJUST_LR_CHOICES)}.")
        for name in ("adamw_lr", "adamw_weight_decay", "adamw_eps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise HfEffllmError(f"{name}={value} must be >= 0.")
        for name in ("adamw_beta1", "adamw_beta2"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise HfEffllmError(f"{name}={value} is out of range; use 0 <= {name} < 1.")
        if self.distributed not in ("auto", "off"):
            raise HfEffllmError(f"distributed={self.distributed!r} is not supported; use 'auto' or 'off'.")
        if self.compile not in ("auto", "true", "false"):
            raise HfEffllmError(f"compile={self.compile!r} is not supported; use 'auto', 'true' or 'false'.")

    @classmethod
    def from_optim_args(cls, optim_args: str | dict[str, Any] | None) -> MuonConfig:
        """Parse ``TrainingArguments.optim_args`` (``"key=value,key=value"``); unknown keys and bad values raise.

        Args:
            optim_args: the string (or an already parsed dict of strings/values), or None.

        Returns:
            The validated config.
        """
        if not optim_args:
            return cls()
        if isinstance(optim_args, str):
            items: dict[str, Any] = {}
            for token in optim_args.replace(" ", "").split(","):
                if not token:
                    continue
                key, sep, value = token.partition("=")
                if not sep or not key:
                    raise HfEffllmError(f"optim_args={optim_args!r}: {token!r} is not key=value.")
                if key in items:
                    raise HfEffllmError(f"optim_args={optim_args!r}: {key!r} is given twice.")
                items[key] = value
        else:
            items = dict(optim_args)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "ns_coefficients"}
        unknown = sorted(set(items) - set(fields))
        if unknown:
            raise HfEffllmError(f"optim_args has unknown key(s) {unknown} for optim='muon'; allowed: {sorted(fields)}.")
        return cls(**{k: _coerce(k, v, fields[k].type) for k, v in items.items()})


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = str(annotation)
    if value.lower() == "none" and "None" in text:
        return None
    try:
        if text.startswith("bool"):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
    except ValueError:
        kind = text.split(" ")[0]
        raise HfEffllmError(f"optim_args: {key}={value!r} is not a valid {kind}.") from None
    return value


@dataclass
class ParamInfo:
    """How :func:`classify_parameters` routes one parameter."""

    name: str
    param: nn.Parameter
    use_muon: bool
    reason: str
    splits: tuple[int, ...] | None = None


def _module_of(model: nn.Module, name: str) -> tuple[str, nn.Module | None]:
    path = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        return path, model.get_submodule(path) if path else model
    except AttributeError:
        return path, None


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def fused_splits(name: str, shape: Sequence[int], config: Any) -> tuple[int, ...] | None:
    """Row blocks of a fused projection whose blocks are separate matrices (contiguous [q|k|v] or [gate|up]).

    Args:
        name: parameter name (``...qkv_proj.weight``, ``...gate_up_proj``).
        shape: its shape, output rows at dim -2.
        config: the model's (text) config, for head counts and intermediate sizes.

    Returns:
        The row sizes of the blocks along dim -2, or None when the parameter is not a known fused layout.
    """
    if config is None or len(shape) < 2:
        return None
    rows = shape[-2]
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if leaf == "qkv_proj":
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None
        )
        if heads and head_dim and rows == (heads + 2 * kv_heads) * head_dim:
            return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if leaf == "kv_a_proj_with_mqa":  # DeepSeek MLA: [compressed KV latent | shared RoPE key]
        latent, rope = getattr(config, "kv_lora_rank", None), getattr(config, "qk_rope_head_dim", None)
        if latent and rope and rows == latent + rope:
            return (latent, rope)
    if leaf == "gate_up_proj":
        sizes = {getattr(config, k, None) for k in ("intermediate_size", "moe_intermediate_size")}
        if any(s and rows == 2 * s for s in sizes):
            return (rows // 2, rows // 2)
    return None


def classify_parameters(model: nn.Module, *, split_fused: bool = True) -> list[ParamInfo]:
    """Decide Muon or AdamW for each trainable parameter of ``model``.

    AdamW: embeddings (every ``nn.Embedding`` and the input embeddings), the output head (tied or not, and
    ``score``/``classifier`` heads), parameters with fewer than 2 or more than 3 dimensions, 3-D parameters that
    are not stacked experts, MoE router / gate weights, and matrices with a dimension of 1. Muon: every other 2-D
    matrix, and each expert of a 3-D ``experts.*`` weight.

    Args:
        model: any ``nn.Module`` (a transformers model, possibly wrapped by DDP or FSDP2).
        split_fused: split fused QKV / gate-up projections into their blocks (see :func:`fused_splits`).

    Returns:
        One :class:`ParamInfo` per trainable parameter, in ``named_parameters`` order.
    """
    inner = getattr(model, "module", model)
    embeddings: set[int] = {id(m.weight) for m in inner.modules() if isinstance(m, nn.Embedding)}
    heads: set[int] = set()
    for getter, ids in (("get_input_embeddings", embeddings), ("get_output_embeddings", heads)):
        fn = getattr(inner, getter, None)
        try:
            module = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            ids.add(id(weight))
    config = _text_config(inner)
    infos: list[ParamInfo] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        path, owner = _module_of(model, name)
        leaf_module = path.rsplit(".", 1)[-1]
        if id(p) in embeddings:
            infos.append(ParamInfo(name, p, False, "embedding"))
        elif id(p) in heads or leaf_module in _HEAD_MODULE_NAMES:
            infos.append(ParamInfo(name, p, False, "output head"))
        elif p.ndim < 2:
            infos.append(ParamInfo(name, p, False, "norm/bias/scalar"))
        elif p.ndim > 3:
            infos.append(ParamInfo(name, p, False, f"{p.ndim}-D tensor"))
        elif leaf_module in _ROUTER_MODULE_NAMES or "router" in type(owner).__name__.lower():
            infos.append(ParamInfo(name, p, False, "MoE router"))
        elif p.ndim == 3 and "experts" not in name.split("."):
            infos.append(ParamInfo(name, p, False, "3-D tensor that is not stacked experts"))
        elif min(p.shape[-2:]) == 1:
            infos.append(ParamInfo(name, p, False, "vector-shaped matrix"))
        else:
            splits = fused_splits(name, p.shape, config) if split_fused else None
            infos.append(ParamInfo(name, p, True, "stacked experts" if p.ndim == 3 else "hidden matrix", splits))
    return infos


def lr_adjustment(rows: int, cols: int, adjust_lr: str) -> float:
    """The factor on the learning rate of one ``rows x cols`` Muon matrix."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


_MUON_KEYS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_dtype", "eps", "adjust_lr")
_ADAMW_KEYS = ("betas", "adamw_eps")


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices and AdamW for the rest, as one optimizer (one ``state_dict``, one LR schedule).

    Build it with :meth:`from_model` (what ``optim="muon"`` does) or from parameter groups that each say
    ``use_muon=True`` or ``False``. Muon groups may hold 2-D matrices and 3-D stacks of matrices (orthogonalised per
    matrix); a group may carry ``splits`` (one entry per parameter, None or row-block sizes of a fused projection).

    Args:
        params: parameter groups (dicts with ``params`` and ``use_muon``).
        lr: default learning rate of Muon groups.
        weight_decay: default decoupled weight decay (``p *= 1 - lr * weight_decay``).
        betas: AdamW betas.
        adamw_eps: AdamW epsilon.
        config: the Muon options (momentum, Newton-Schulz, lr adjustment, distribution, compile).
        process_group: group over which the Newton-Schulz work is shared (default: the world, when initialised).

    Example:
        >>> groups = [{"params": hidden, "use_muon": True}, {"params": others, "use_muon": False, "lr": 3e-4}]
        >>> opt = Muon(groups, lr=0.02, config=MuonConfig(adjust_lr="original"))
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        config: MuonConfig | None = None,
        process_group: Any = None,
    ) -> None:
        config = config or MuonConfig()
        if lr < 0:
            raise HfEffllmError(f"lr={lr} must be >= 0.")
        if weight_decay < 0:
            raise HfEffllmError(f"weight_decay={weight_decay} must be >= 0.")
        self.config = config
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            **{k: getattr(config, k) for k in _MUON_KEYS},
            "betas": tuple(betas),
            "adamw_eps": adamw_eps,
        }
        groups = list(params)
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or "use_muon" not in group:
                raise HfEffllmError(
                    f"params[{i}] is not a dict with 'use_muon'; build the optimizer with Muon.from_model(model) or "
                    "pass groups such as {'params': [...], 'use_muon': True}."
                )
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            splits = group.setdefault("splits", [None] * len(group["params"]))
            names = group.get("names") or [f"params[{i}]" for i in range(len(group["params"]))]
            if len(splits) != len(group["params"]):
                raise HfEffllmError(f"splits has {len(splits)} entries for {len(group['params'])} parameters.")
            for p, s, n in zip(group["params"], splits, names):
                if p.ndim not in (2, 3):
                    raise HfEffllmError(
                        f"parameter {n} of shape {tuple(p.shape)} cannot take Muon (needs a 2-D matrix or a 3-D "
                        "stack of matrices); put it in a use_muon=False (AdamW) group."
                    )
                if s is not None and sum(s) != p.shape[-2]:
                    raise HfEffllmError(f"splits={s} of {n} do not add up to its {p.shape[-2]} rows.")
        self._process_group = process_group
        self._checked_signature: str | None = None
        self.last_step_stats: dict[str, int] = {}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        config: MuonConfig | None = None,
        process_group: Any = None,
        **config_overrides: Any,
    ) -> Muon:
        """Group ``model``'s parameters (:func:`classify_parameters`) and build the optimizer.

        Args:
            model: the model (plain, DDP-wrapped or FSDP2-sharded).
            lr: learning rate of the Muon matrices (and of AdamW unless ``config.adamw_lr`` is set).
            weight_decay: decoupled weight decay of the matrices; norms and biases get none.
            betas: AdamW betas, unless set in the config.
            adamw_eps: AdamW epsilon, unless set in the config.
            config: options; ``config_overrides`` are applied on top (``Muon.from_model(m, momentum=0.9)``).
            process_group: see :class:`Muon`.

        Returns:
            The optimizer. A model without any matrix for Muon falls back to AdamW for everything (logged).
        """
        config = dataclasses.replace(config or MuonConfig(), **config_overrides)
        infos = classify_parameters(model, split_fused=config.split_fused)
        if not infos:
            raise HfEffllmError("model has no trainable parameters; nothing to optimise.")
        adamw_lr = lr if config.adamw_lr is None else config.adamw_lr
        adamw_wd = weight_decay if config.adamw_weight_decay is None else config.adamw_weight_decay
        betas = (
            betas[0] if config.adamw_beta1 is None else config.adamw_beta1,
            betas[1] if config.adamw_beta2 is None else config.adamw_beta2,
        )
        adamw_eps = adamw_eps if config.adamw_eps is None else config.adamw_eps
        muon = [i for i in infos if i.use_muon]
        decay = [i for i in infos if not i.use_muon and i.param.ndim >= 2]
        no_decay = [i for i in infos if not i.use_muon and i.param.ndim < 2]
        groups: list[dict[str, Any]] = []
        if muon:
            groups.append(
                {
                    "params": [i.param for i in muon],
                    "names": [i.name for i in muon],
                    "splits": [i.splits for i in muon],
                    "use_muon": True,
                }
            )
        else:
            logger.warning("Muon: the model has no hidden weight matrix; every parameter is trained with AdamW.")
        for members, wd in ((decay, adamw_wd), (no_decay, 0.0)):
            if members:
                groups.append(
                    {
                        "params": [i.param for i in members],
                        "names": [i.name for i in members],
                        "use_muon": False,
                        "lr": adamw_lr,
                        "weight_decay": wd,
                    }
                )
        reasons: dict[str, int] = {}
        for i in infos:
            if not i.use_muon:
                reasons[i.reason] = reasons.get(i.reason, 0) + 1
        logger.info(
            "Muon: %d tensors (%.1fM params) with Muon, %d fused; AdamW for %s",
            len(muon),
            sum(i.param.numel() for i in muon) / 1e6,
            sum(i.splits is not None for i in muon),
            ", ".join(f"{n} {r}" for r, n in reasons.items()) or "nothing",
        )
        return cls(
            groups,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            adamw_eps=adamw_eps,
            config=config,
            process_group=process_group,
        )

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimisation step of every group (Muon groups first, then AdamW groups)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_groups = [g for g in self.param_groups if g["use_muon"]]
        if muon_groups:
            self._muon_step(muon_groups)
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        return loss

    def _world(self) -> tuple[Any, int, int]:
        import torch.distributed as dist

        if self.config.distributed == "off" or not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        group = self._process_group or dist.group.WORLD
        world = dist.get_world_size(group)
        return (group, world, dist.get_rank(group)) if world > 1 else (None, 1, 0)

    def _use_compile(self, device: torch.device) -> bool:
        if self.config.compile == "auto":
            return device.type == "cuda"
        return self.config.compile == "true"

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        # 1. momentum (on local shards), 2. full update matrices, 3. batched Newton-Schulz per shape,
        # shared over ranks, 4. decoupled weight decay and the scaled update on local shards.
        entries: list[tuple[dict[str, Any], Tensor, Tensor, tuple[int, ...]]] = []
        for group in groups:
            params, grads, bufs, splits = [], [], [], []
            for p, s in zip(group["params"], group["splits"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise HfEffllmError("Muon does not support sparse gradients; use a dense embedding/AdamW group.")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
                splits.append(tuple(s) if s is not None else (p.shape[-2],))
            if not params:
                continue
            m = group["momentum"]
            updates = _momentum(grads, bufs, m, group["nesterov"])
            entries.extend(zip([group] * len(params), params, updates, splits))
        if not entries:
            return

        # Pieces: (entry index, row offset, rows, cols, count) grouped by canonical shape and NS settings.
        buckets: dict[tuple[Any, ...], list[tuple[int, int, Tensor]]] = {}
        fulls: list[Tensor] = []
        for idx, (group, _p, update, splits) in enumerate(entries):
            full = update.full_tensor() if _is_dtensor(update) else update
            fulls.append(full)
            cols = full.shape[-1]
            offset = 0
            for rows in splits:
                key = (
                    min(rows, cols),
                    max(rows, cols),
                    group["ns_steps"],
                    tuple(group["ns_coefficients"]),
                    group["eps"],
                    group["ns_dtype"],
                )
                buckets.setdefault(key, []).append((idx, offset, full[..., offset : offset + rows, :]))
                offset += rows
        pg, world, rank = self._world()
        if world > 1:
            self._check_same_work(pg, buckets)
        device = fulls[0].device
        compile_ns = self._use_compile(device)
        results: dict[tuple[Any, ...], Tensor] = {}
        local_outputs: list[tuple[tuple[Any, ...], int, int, Tensor]] = []
        computed = 0
        for key, pieces in buckets.items():
            r, c, steps, coeffs, eps, ns_dtype = key
            mats = [(pc.mT if pc.shape[-2] > pc.shape[-1] else pc).reshape(-1, r, c) for _, _, pc in pieces]
            counts = [mm.shape[0] for mm in mats]
            total = sum(counts)
            if world > 1:
                chunk = -(-total // world)
                lo, hi = min(total, rank * chunk), min(total, (rank + 1) * chunk)
                mine = _slice_rows(mats, counts, lo, hi)
            else:
                chunk, lo, hi = total, 0, total
                mine = torch.cat(mats) if len(mats) > 1 else mats[0]
            if world == 1:  # the Newton-Schulz output is the result: no staging buffer, no copy
                out = newton_schulz(
                    mine, steps=steps, coefficients=coeffs, eps=eps, dtype=_NS_DTYPES[ns_dtype], compile=compile_ns
                )
                computed += total
            else:
                out = torch.zeros((chunk, r, c), dtype=_NS_DTYPES[ns_dtype], device=device)
                if hi > lo:
                    out[: hi - lo] = newton_schulz(
                        mine, steps=steps, coefficients=coeffs, eps=eps, dtype=_NS_DTYPES[ns_dtype], compile=compile_ns
                    )
                    computed += hi - lo
            local_outputs.append((key, chunk, total, out))
        if world > 1:
            results = _all_gather_outputs(local_outputs, pg, world)
        else:
            results = {key: out for key, _, _, out in local_outputs}
        self.last_step_stats = {"matrices": sum(o[2] for o in local_outputs), "orthogonalised_here": computed}

        # Decoupled weight decay, one foreach launch per (lr, wd) for plain tensors.
        decay: dict[tuple[float, torch.device, torch.dtype], list[Tensor]] = {}
        for group, p, _update, _splits in entries:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            if wd:
                target = _local(p)
                decay.setdefault((1.0 - lr * wd, target.device, target.dtype), []).append(target)
        for (factor, _dev, _dt), targets in decay.items():
            torch._foreach_mul_(targets, factor)

        # Apply each orthogonalised block with the lr adjustment of its own shape: straight into the parameter (one
        # add per block) for plain tensors; DTensor parameters get the full update, redistributed to their shards.
        dtensor_updates: dict[int, tuple[Tensor, list[tuple[int, int, float]]]] = {}
        for key, pieces in buckets.items():
            ortho = results[key]
            start = 0
            for idx, offset, piece in pieces:
                rows, cols = piece.shape[-2], piece.shape[-1]
                n = piece.numel() // (rows * cols)
                block = ortho[start : start + n]
                start += n
                if rows > cols:
                    block = block.mT
                group, p = entries[idx][0], entries[idx][1]
                alpha = -float(group["lr"]) * lr_adjustment(rows, cols, group["adjust_lr"])
                if _is_dtensor(p):
                    if idx not in dtensor_updates:
                        dtensor_updates[idx] = (torch.empty(fulls[idx].shape, dtype=p.dtype, device=device), [])
                    full, spans = dtensor_updates[idx]
                    full[..., offset : offset + rows, :].copy_(block.reshape(piece.shape))
                    spans.append((offset, rows, alpha))
                else:
                    dest = p.data[..., offset : offset + rows, :]
                    dest.add_(block.reshape(piece.shape).to(dest.dtype), alpha=alpha)
        for idx, (full, spans) in dtensor_updates.items():
            from torch.distributed.tensor import distribute_tensor

            p = entries[idx][1]
            alphas = {a for *_, a in spans}
            if len(alphas) > 1:  # row blocks of different shapes (fused QKV): scale each block before sharding
                for offset, rows, a in spans:
                    full[..., offset : offset + rows, :].mul_(a)
                alpha = 1.0
            else:  # one scale: the same single add as for a plain tensor (bit-identical to one process)
                alpha = alphas.pop()
            _local(p).add_(
                distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local(), alpha=alpha
            )

    def _check_same_work(self, pg: Any, buckets: dict[tuple[Any, ...], list[Any]]) -> None:
        import torch.distributed as dist

        signature = repr([(k, sum(pc.numel() for *_, pc in v)) for k, v in buckets.items()])
        if signature == self._checked_signature:
            return
        digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
        device = next(iter(buckets.values()))[0][2].device
        if dist.get_backend(pg) == "gloo":
            device = torch.device("cpu")
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=pg)
        if int(t[0]) != digest or int(t[1]) != -digest:
            raise HfEffllmError(
                "Muon: the ranks hold different matrices (or gradients for different parameters), so the "
                "Newton-Schulz work cannot be shared; pass optim_args 'distributed=off' (e.g. pipeline parallelism)."
            )
        self._checked_signature = signature

    def _adamw_step(self, group: dict[str, Any]) -> None:
        from torch.optim.adamw import adamw

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        fused = all(p.is_cuda and not _is_dtensor(p) and p.dtype in (torch.float32, torch.bfloat16) for p in params)
        if fused:
            for p, st in zip(params, (self.state[p] for p in params)):
                if st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device)
            steps = [self.state[p]["step"] for p in params]
        else:
            for st in (self.state[p] for p in params):
                if st["step"].device.type != "cpu":
                    st["step"] = st["step"].cpu()
            steps = [self.state[p]["step"] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else (not any(_is_dtensor(p) for p in params) or None),
            fused=True if fused else None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            eps=group["adamw_eps"],
            maximize=False,
        )


def _momentum(grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool) -> list[Tensor]:
    # buf <- lerp(buf, g, 1 - m); update <- lerp(g, buf, m) (Nesterov) or buf, as torch.optim.Muon.
    plain = not any(_is_dtensor(g) for g in grads) and len({(g.device, g.dtype) for g in grads}) == 1
    if plain:
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
        return list(torch._foreach_lerp(grads, bufs, momentum)) if nesterov else list(bufs)
    out = []
    for g, b in zip(grads, bufs):
        b.lerp_(g, 1.0 - momentum)
        out.append(g.lerp(b, momentum) if nesterov else b)
    return out


def _slice_rows(mats: list[Tensor], counts: list[int], lo: int, hi: int) -> Tensor:
    parts, start = [], 0
    for m, n in zip(mats, counts):
        a, b = max(lo, start), min(hi, start + n)
        if b > a:
            parts.append(m[a - start : b - start])
        start += n
    if not parts:
        return mats[0][:0]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _all_gather_outputs(
    local_outputs: list[tuple[tuple[Any, ...], int, int, Tensor]], pg: Any, world: int
) -> dict[tuple[Any, ...], Tensor]:
    """One all-gather of every rank's share of every bucket (grouped by dtype), unpacked per bucket."""
    import torch.distributed as dist

    results: dict[tuple[Any, ...], Tensor] = {}
    by_dtype: dict[torch.dtype, list[tuple[tuple[Any, ...], int, int, Tensor]]] = {}
    for item in local_outputs:
        by_dtype.setdefault(item[3].dtype, []).append(item)
    for dtype, items in by_dtype.items():
        flat = torch.cat([out.reshape(-1) for *_, out in items])
        gathered = torch.empty(world * flat.numel(), dtype=dtype, device=flat.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        gather(gathered, flat, group=pg)
        gathered = gathered.view(world, -1)
        offset = 0
        for key, chunk, total, out in items:
            size = out.numel()
            r, c = out.shape[-2:]
            results[key] = gathered[:, offset : offset + size].reshape(world * chunk, r, c)[:total]
            offset += size
    return results


def muon_optimizer_summary(optimizer: Muon) -> list[dict[str, Any]]:
    """Per-parameter routing of a :class:`Muon` (name, shape, optimizer, blocks) for logs and tests."""
    rows = []
    for group in optimizer.param_groups:
        names = group.get("names") or [None] * len(group["params"])
        splits = group.get("splits") or [None] * len(group["params"])
        for p, n, s in zip(group["params"], names, splits):
            rows.append(
                {"name": n, "shape": tuple(p.shape), "optimizer": "muon" if group["use_muon"] else "adamw", "splits": s}
            )
    return rows


class MuonFactory:
    """What the Trainer's ``optim="muon"`` handler returns: ``MuonFactory()(model, **kwargs)`` builds :class:`Muon`.

    The Trainer treats a non-``Optimizer`` first element of a handler's result as a factory and calls it with the
    model, which the parameter grouping needs (embeddings, head and routers are found through the model).
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> Muon:
        return Muon.from_model(model, **kwargs)


def trainer_handler(ctx: Any) -> tuple[type[MuonFactory], dict[str, Any]]:
    """Handler for ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``: ``TrainingArguments`` -> Muon kwargs."""
    args = ctx.args
    config = MuonConfig.from_optim_args(args.optim_args)
    return MuonFactory, {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "adamw_eps": args.adam_epsilon,
        "config": config,
    }


OPTIM_NAME = "muon"


def register_trainer_optimizer() -> str:
    """Make ``TrainingArguments(optim="muon")`` build :class:`Muon` in ``Trainer`` (idempotent; run on import).

    Returns:
        The registered name: "muon", or "hf_effllm_muon" if a transformers release ships its own "muon".
    """
    from transformers import trainer_optimizer

    from ..compat import add_optimizer_name
    from ..registration import register_in_mapping

    name = OPTIM_NAME
    existing = trainer_optimizer._OPTIMIZER_HANDLERS.get(name)
    if existing is not None and getattr(existing, "__module__", "") != __name__:
        name = "hf_effllm_muon"
        logger.warning("transformers has its own optim='muon'; hf-effllm's Muon is optim=%r.", name)
    member = add_optimizer_name(name)
    register_in_mapping(trainer_optimizer._OPTIMIZER_HANDLERS, member, trainer_handler, what="Trainer optimizer")
    return name
