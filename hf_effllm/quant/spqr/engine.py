"""SpQR calibration and quantization (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation").

Per linear layer: Hessian ``H = 2 X X^T / n`` of its calibration inputs, dampening ``percdamp * mean(diag H)``,
optional act-order permutation, upper Cholesky factor ``U`` of ``H^-1``, then a GPTQ sweep over the columns in lazy
batches: at the start of each group of ``group_size`` columns the per-row min-max scales and zero-points are fitted
(leaving out the weights the leave-one-out test marks as likely outliers) and quantized to ``stats_bits`` over
blocks of ``stats_group_size`` rows; each column is quantized, weights whose Hessian-weighted error exceeds the
threshold become 16-bit outliers, and the error is fed back into the columns not yet quantized.

Decoder layers are calibrated in order: the inputs of layer ``i`` are the outputs of the already-quantized layers
``0..i-1``. The inputs of the first layer are captured with a forward pre-hook (no copy of any modeling code).

Why not optimum's GPTQ module: its input capture is inline in ``GPTQQuantizer.quantize_model`` (not callable alone),
its per-layer algorithm comes from ``gptqmodel`` (plain GPTQ: no bi-level statistics, no outliers), and its data
helpers download wikitext/C4; :func:`hf_effllm.data.calibration_batches` already covers the data part here.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import HfEffllmError
from .config import SpQRConfig
from .experts import EXPERT_PARAMS, expert_hessians, experts_modules, record_name
from .format import dequantize_weight, index_dtype, pack_flat, quantize_stats, stored_bits, tensor_crc32

_SUB = 16


@dataclass
class QuantizedMatrix:
    """The result of :func:`spqr_quantize_matrix`: packed tensors and the dequantized weight (original order)."""

    tensors: dict[str, torch.Tensor]
    weight: torch.Tensor
    nnz: int
    avg_bits: float


def leave_one_out_reduction(group: torch.Tensor, hinv_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """How much the Hessian-weighted squared error of each row's group drops if one weight is left unquantized.

    Leaving weight j out changes the min-max statistics only when j is the row's minimum or maximum, so three
    quantizers per row (full range, without the minimum, without the maximum) give every leave-one-out error in
    O(rows * n) instead of the O(rows * n^2) of refitting n times.

    Args:
        group: weights (rows, n) of one column group.
        hinv_diag: the diagonal of the inverse-Hessian Cholesky factor for those n columns.
        bits: code bits.

    Returns:
        (rows, n) error reductions; large values mark likely outliers (the paper's leave-one-out test).
    """
    n = group.shape[1]
    if n < 2:
        return torch.zeros_like(group)
    maxq = 2**bits - 1
    srt = group.sort(1).values
    lo, lo2, hi, hi2 = srt[:, :1], srt[:, 1:2], srt[:, -1:], srt[:, -2:-1]

    def sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        scale = ((b - a) / maxq).clamp_min(1e-12)
        rec = a + torch.round((group - a) / scale).clamp(0, maxq) * scale
        return ((rec - group) / hinv_diag).square()

    e_all, e_nomin, e_nomax = sq_err(lo, hi), sq_err(lo2, hi), sq_err(lo, hi2)
    base = e_all.sum(1, keepdim=True)
    idx = torch.arange(n, device=group.device)
    loo = base - e_all
    loo = torch.where(idx == group.argmin(1, keepdim=True), e_nomin.sum(1, keepdim=True) - e_nomin, loo)
    loo = torch.where(idx == group.argmax(1, keepdim=True), e_nomax.sum(1, keepdim=True) - e_nomax, loo)
    return base - loo


def _inverse_hessian_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    n = h.shape[0]
    damp = percdamp * torch.diag(h).mean()
    eye = torch.eye(n, device=h.device, dtype=h.dtype)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * (10**attempt) * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise HfEffllmError(
        f"the Hessian is not positive definite even with percdamp={percdamp}*1e5; use a larger percdamp."
    )


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Calibration is thousands of small ops: on the CPU, intra-op threads mostly add synchronisation (the sweep ran
    10x slower with two threads on a loaded 2-core machine), so it runs on one thread."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def spqr_quantize_matrix(weight: torch.Tensor, hessian: torch.Tensor | None, config: SpQRConfig) -> QuantizedMatrix:
    """Quantize one weight matrix with SpQR (or plain GPTQ with ``outlier_threshold=inf``).

    Args:
        weight: (out, in) float weight.
        hessian: (in, in) ``2 X X^T / n`` of the calibration inputs; ``None`` means identity (round-to-nearest
            with bi-level statistics, no error feedback).
        config: the bits, groups, threshold, permutation and dampening to use.

    Returns:
        A :class:`QuantizedMatrix` whose ``weight`` equals the dequantization of its packed ``tensors``.

    Example:
        >>> q = spqr_quantize_matrix(torch.randn(32, 48), None, SpQRConfig(bits=4))
        >>> q.weight.shape
        torch.Size([32, 48])
    """
    with torch.no_grad(), _one_cpu_thread(weight.device):
        return _quantize_matrix(weight, hessian, config)


def _quantize_matrix(weight: torch.Tensor, hessian: torch.Tensor | None, config: SpQRConfig) -> QuantizedMatrix:
    bits, gs, sb, sgs = config.bits, config.group_size, config.stats_bits, config.stats_group_size
    maxq = 2**bits - 1
    w = weight.detach().float().clone()
    out, n = w.shape
    h = torch.eye(n, device=w.device) if hessian is None else hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if config.permutation == "act_order":
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = None
    u = _inverse_hessian_cholesky(h, config.percdamp)
    u_diag = torch.diag(u)
    use_outliers = config.enable_outliers
    threshold = config.outlier_threshold * (w.var(dim=0, correction=0) / u_diag.square()).mean().item()
    use_outliers = use_outliers and math.isfinite(threshold) and threshold > 0  # e.g. a single output row

    n_groups = -(-n // gs)
    scale_codes = torch.zeros(out, n_groups, dtype=torch.int64, device=w.device)
    zero_codes = torch.zeros_like(scale_codes)
    stats2 = torch.zeros(-(-out // sgs), n_groups, 4, dtype=torch.float16, device=w.device)
    # the sweep works on the transpose so that a column and a lazy block of columns are contiguous in memory
    wt = w.T.contiguous()
    codes_t = torch.zeros(n, out, dtype=torch.int64, device=w.device)
    corrections_t = torch.zeros(n, out, dtype=torch.float16, device=w.device)
    outlier_mask_t = torch.zeros(n, out, dtype=torch.bool, device=w.device)
    errors_t = torch.zeros_like(wt)
    blocksize = -(-config.blocksize // gs) * gs  # a group never straddles two lazy blocks
    # every group starts a sub-block or lies inside one, so its statistics see the updates of all earlier columns
    sub = _SUB if _SUB % gs == 0 or gs % _SUB == 0 else math.gcd(_SUB, gs)
    scale = zero = None
    for b0 in range(0, n, blocksize):
        b1 = min(b0 + blocksize, n)
        for c in range(b0, b1):
            if c % gs == 0:
                g = c // gs
                group = wt[c : c + gs].T
                if use_outliers:
                    likely = leave_one_out_reduction(group, u_diag[c : c + gs], bits) > threshold
                    likely &= ~likely.all(1, keepdim=True)  # a row needs some inliers to fit its statistics
                    keep = (~likely).float()
                    mean = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                    group = group * keep + mean * (1 - keep)
                lo, hi = group.amin(1), group.amax(1)
                # a floor keeps the first-level scale > 0 and |zero| <= 1024; the second level rounds it to nearest,
                # which can drop a small scale in a block with a large one to the block's minimum, so it keeps
                # |zero| <= 2^14 (lower=): beyond, -lo / scale overflowed fp16 and broke the whole block of rows
                amax = torch.maximum(lo.abs(), hi.abs())
                floor = amax.div(1024).clamp_min(1e-6)
                raw_scale = torch.maximum((hi - lo) / maxq, floor)
                sc, s_step, s_min, scale = quantize_stats(raw_scale[:, None], sb, sgs, lower=amax[:, None] / 2**14)
                zc, z_step, z_min, zero = quantize_stats((-lo / scale[:, 0])[:, None], sb, sgs)
                scale, zero = scale[:, 0], zero[:, 0]
                scale_codes[:, g], zero_codes[:, g] = sc[:, 0], zc[:, 0]
                stats2[:, g] = torch.stack([s_step[:, 0], s_min[:, 0], z_step[:, 0], z_min[:, 0]], dim=-1)
                inv_scale = 1.0 / scale.clamp_min(1e-30)
            col = wt[c]
            q = torch.round(col * inv_scale + zero).clamp_(0, maxq)
            deq = scale * (q - zero)
            if use_outliers:
                diff = col - deq
                is_out = diff.square() > threshold * u_diag[c].square()
                if bool(is_out.any()):
                    corr = torch.where(is_out, diff, torch.zeros_like(diff)).to(torch.float16)
                    corrections_t[c] = corr
                    outlier_mask_t[c] = is_out
                    deq = deq + corr.float()
            codes_t[c] = q.to(torch.int64)
            err = (col - deq) / u_diag[c]
            errors_t[c] = err
            wt[c] = deq
            # two-level lazy updates: column by column inside sub-blocks of <= 16 columns, then one matmul per sub-block
            s1 = min((c // sub + 1) * sub, b1)
            if c + 1 < s1:
                wt[c + 1 : s1].addr_(u[c, c + 1 : s1], err, alpha=-1)
            if c + 1 == s1 and s1 < b1:
                s0 = max((c // sub) * sub, b0)
                wt[s1:b1].addmm_(u[s0:s1, s1:b1].T, errors_t[s0:s1], alpha=-1)
        if b1 < n:
            wt[b1:].addmm_(u[b0:b1, b1:].T, errors_t[b0:b1], alpha=-1)
    codes, corrections, outlier_mask = codes_t.T, corrections_t.T, outlier_mask_t.T

    rows, cols = outlier_mask.nonzero(as_tuple=True)
    counts = outlier_mask.sum(1)
    row_ptr = torch.zeros(out + 1, dtype=torch.int32, device=w.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    tensors = {
        "qweight": pack_flat(codes, bits),
        "qscale": pack_flat(scale_codes, sb),
        "qzero": pack_flat(zero_codes, sb),
        "stats2": stats2,
        "outlier_values": corrections[rows, cols].contiguous(),
        "outlier_cols": cols.to(index_dtype(n)),
        "outlier_row_ptr": row_ptr,
    }
    if perm is not None:
        tensors["perm"] = perm.to(index_dtype(n))
    deq_w = dequantize_weight(tensors, in_features=n, bits=bits, group_size=gs, stats_bits=sb, stats_group_size=sgs)
    if perm is not None:
        deq_w = deq_w[:, torch.argsort(perm)]
    if not bool(torch.isfinite(deq_w).all()):  # never a silently broken layer
        raise HfEffllmError(
            f"SpQR quantization of a ({out}, {n}) weight gave non-finite values (weight max |w| "
            f"{weight.abs().max().item():.3g}); check the weight and calibration data for inf/NaN, or use a larger "
            f"percdamp (now {config.percdamp})."
        )
    nnz = int(rows.numel())
    return QuantizedMatrix(tensors=tensors, weight=deq_w, nnz=nnz, avg_bits=stored_bits(tensors) / (out * n))


# ---------------------------------------------------------------------------------------------------------------
# Sequential calibration of a whole model


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module, skip: list[str] | None = None) -> tuple[str, nn.ModuleList]:
    """The longest ``nn.ModuleList`` of blocks that contain ``nn.Linear`` layers (the decoder layers), leaving out
    lists inside the modules named in ``skip`` (e.g. a VLM's ``"vision_tower"``)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and not _skipped(name, skip or [])
            and len(module) > 0
            and any(isinstance(m, nn.Linear) for m in module[0].modules())
            and (best is None or len(module) > len(best[1]))
        ):
            best = (name, module)
    if best is None:
        raise HfEffllmError(
            f"{type(model).__name__} has no list of decoder layers with nn.Linear modules; SpQR has nothing to convert."
        )
    return best


def _skipped(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` contains one of ``patterns`` as whole dotted components ("lm_head", "self_attn", ...)."""
    return any(f".{p}." in f".{name}." for p in patterns)


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """The output head (and anything tied to it) and scalar gates (``nn.Linear`` with one output, e.g. qwen2_moe's
    ``shared_expert_gate``, whose single row cannot share second-level statistics): kept in float unless the user
    says otherwise."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n, m in model.named_modules() if head is not None and m is head] or ["lm_head"]
    gates = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1}
    return heads + sorted(gates - set(heads))


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture_first_layer_inputs(model: nn.Module, layer: nn.Module, batches: torch.Tensor):
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        inputs.append(hs.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        handle.remove()
    return inputs, kwargs_list


def _call_groups(layer: nn.Module, targets: dict[str, nn.Linear], x: torch.Tensor, kw: dict[str, Any]):
    """Group the target linears by shared input tensor, in the order they are first called."""
    seen: dict[tuple, list[str]] = {}
    alive: list[torch.Tensor] = []  # holding the inputs keeps their memory from being reused by later tensors
    handles = []
    for name, lin in targets.items():

        def hook(_m, args, _name=name):
            a = args[0]
            alive.append(a)
            seen.setdefault((a.data_ptr(), tuple(a.shape), a.stride()), []).append(_name)

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        layer(x, **kw)
    finally:
        for h in handles:
            h.remove()
    groups = [list(dict.fromkeys(names)) for names in seen.values()]
    called = {n for g in groups for n in g}
    missing = [n for n in targets if n not in called]
    return groups + [[n] for n in missing]


def calibration_data(model: nn.Module, config: SpQRConfig, tokenizer: Any = None) -> torch.Tensor:
    """The (nsamples, seqlen) calibration token ids for ``model`` from ``config.dataset`` (or the corpus)."""
    from ...data import calibration_batches

    tok = tokenizer if tokenizer is not None else config.tokenizer
    if tok is None:
        from transformers import AutoTokenizer

        source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not source:
            raise HfEffllmError("SpQRConfig.tokenizer=None and the model does not say where it came from; pass one.")
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise HfEffllmError(
                f"SpQRConfig.tokenizer=None and no tokenizer could be loaded from {source!r}; pass tokenizer=..."
            ) from e
    return calibration_batches(
        tok, nsamples=config.nsamples, seqlen=config.seqlen, texts=config.dataset, seed=config.seed
    )


@torch.no_grad()
def calibrate_and_quantize(
    model: nn.Module,
    config: SpQRConfig,
    *,
    tokenizer: Any = None,
    batches: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, QuantizedMatrix]:
    """Sequentially quantize every ``nn.Linear`` of the decoder layers, and every expert matrix of their stacked MoE
    experts (``hf_effllm.quant.spqr.experts``); the model's weights become the dequantized values (so later layers
    calibrate on quantized outputs). Returns the packed result of each matrix by record name.
    """
    if batches is None:
        batches = calibration_data(model, config, tokenizer)
    skip = list(config.modules_to_not_convert or default_modules_to_not_convert(model))
    layers_name, layers = decoder_layers(model, skip)
    prefix = f"{layers_name}." if layers_name else ""
    all_targets = {
        f"{prefix}{i}.{n}": m
        for i, layer in enumerate(layers)
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not _skipped(f"{prefix}{i}.{n}", skip)
    }
    all_experts = {
        f"{prefix}{i}.{n}": m
        for i, layer in enumerate(layers)
        for n, m in experts_modules(layer).items()
        if not _skipped(f"{prefix}{i}.{n}", skip)
    }
    if not all_targets and not all_experts:
        raise HfEffllmError(
            f"{type(model).__name__} has no nn.Linear layers to convert in {layers_name!r} "
            f"(modules_to_not_convert={skip}); nothing to quantize."
        )
    device = next(model.parameters()).device
    with _one_cpu_thread(device):  # measured: on a shared 2-core machine one thread calibrates 2x faster
        return _calibrate(model, config, batches, layers, prefix, all_targets, all_experts, progress)


def _run_with_hooks(layer: nn.Module, inputs: list, kwargs_list: list, handles: list) -> None:
    """Run the layer on every calibration batch, then remove the hooks (also on error)."""
    try:
        for x, kw in zip(inputs, kwargs_list):
            layer(x, **kw)
    finally:
        for handle in handles:
            handle.remove()


def _quantize_experts(layer, experts, inputs, kwargs_list, config, results) -> None:
    """Quantize the stacked experts of one decoder layer, each expert matrix with its own routed-token Hessian."""
    calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in experts}
    handles = []
    for name, mod in experts.items():

        def hook(_m, args, kwargs, _n=name):
            calls[_n].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    _run_with_hooks(layer, inputs, kwargs_list, handles)
    for name, mod in experts.items():
        hessians = expert_hessians(mod, calls.pop(name))
        for param in EXPERT_PARAMS:
            weight = getattr(mod, param)
            for e in range(weight.shape[0]):
                rec = record_name(name, param, e)
                res = spqr_quantize_matrix(weight[e], hessians[param][e][0], config.for_module(rec))
                weight.data[e].copy_(res.weight.to(weight.dtype))
                results[rec] = res


def _calibrate(model, config, batches, layers, prefix, all_targets, all_experts, progress):
    was_training = model.training
    model.eval()
    results: dict[str, QuantizedMatrix] = {}
    t0 = time.perf_counter()
    inputs, kwargs_list = _capture_first_layer_inputs(model, layers[0], batches)
    if not inputs:
        name = prefix.rstrip(".")
        raise HfEffllmError(
            f"the calibration forward (input_ids only) never reached {name!r}, the decoder layers picked for SpQR; "
            f"if they belong to another tower, leave them out with modules_to_not_convert=['lm_head', {name!r}]."
        )
    tune = config.tune_epochs > 0
    float_inputs = list(inputs) if tune else None  # the float model's activations (tuning targets)
    for i, layer in enumerate(layers):
        float_out = None
        if tune:
            float_layer = copy.deepcopy(layer)
            float_out = [_layer_output(float_layer(x, **kw)) for x, kw in zip(float_inputs, kwargs_list)]
            del float_layer
        targets = {k: v for k, v in all_targets.items() if k.startswith(f"{prefix}{i}.")}
        if targets:
            # linears fed the same tensor (q/k/v, gate/up) share one Hessian
            groups = _call_groups(layer, targets, inputs[0], kwargs_list[0])
            for pass_groups in [[g] for g in groups] if config.true_sequential else [groups]:
                heads = {g[0]: g for g in pass_groups}
                hessians = {
                    h: torch.zeros(targets[h].in_features, targets[h].in_features, device=targets[h].weight.device)
                    for h in heads
                }
                counts = dict.fromkeys(heads, 0)
                handles = []
                for h in heads:

                    def hook(_m, args, _n=h, _h=hessians, _c=counts):
                        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                        _h[_n].addmm_(x.T, x)
                        _c[_n] += x.shape[0]

                    handles.append(targets[h].register_forward_pre_hook(hook))
                _run_with_hooks(layer, inputs, kwargs_list, handles)
                for h, members in heads.items():
                    hess = hessians.pop(h) * (2.0 / counts[h]) if counts[h] else None
                    for n in members:
                        lin = targets[n]
                        res = spqr_quantize_matrix(lin.weight, hess, config.for_module(n))
                        lin.weight.data.copy_(res.weight.to(lin.weight.dtype))
                        results[n] = res
        experts = {k: v for k, v in all_experts.items() if k.startswith(f"{prefix}{i}.")}
        if experts:
            _quantize_experts(layer, experts, inputs, kwargs_list, config, results)
        if tune:
            from .tuning import tune_layer

            here = f"{prefix}{i}."
            linears = {k[len(here) :]: results[k] for k in targets}
            tune_layer(layer, linears, inputs, kwargs_list, float_out, config, prefix=here)
            float_inputs = float_out
        inputs = [_layer_output(layer(x, **kw)) for x, kw in zip(inputs, kwargs_list)]
        if progress:
            print(f"[spqr] layer {i + 1}/{len(layers)} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.train(was_training)
    return results


def record_results(config: SpQRConfig, results: dict[str, QuantizedMatrix]) -> None:
    """Write per-layer records and the total honest average bits into ``config``."""
    layers: dict[str, dict[str, Any]] = {}
    total_bits = total_params = 0
    for name, res in results.items():
        out, n = res.weight.shape
        bits = stored_bits(res.tensors)
        layers[name] = {
            "in_features": n,
            "out_features": out,
            "nnz": res.nnz,
            "avg_bits": round(res.avg_bits, 4),
            "crc32": {k: tensor_crc32(v) for k, v in res.tensors.items()},
        }
        total_bits += bits
        total_params += out * n
    config.layers = layers
    config.avg_bits = round(total_bits / total_params, 4) if total_params else math.nan
