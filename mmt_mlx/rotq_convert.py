"""``mmt convert --bpw B``: rotated Gaussian codes with GPTQ rounding, bits spent by measured sensitivity.

1. Calibration (``rotq_calibrate``): input covariances per distinct layer input, and the KL price per unit
   of output error of each bucket (tensor class x first/middle/last layer; the embedding).
2. Screening: every tensor's relative output error at 3 bits with GPTQ in each candidate group size, on a row
   sample (rows are independent given H); other widths follow from the Lloyd-Max distortion of N(0, 1) at each
   width. Vocabulary rows (embedding, LM head) are cut into row bands by token importance (``TokenImportance``:
   the dense model's mean next-token probability and the token's share of the calibration text), each band
   priced by its share of the importance-weighted output energy, so that frequent tokens' rows can buy more bits
   than the long tail of rare ones; no band below the width the planner gives the tensor coded whole at the same
   budget, so text unlike the calibration text loses nothing (``--vocab-rows whole`` codes them at one width).
3. Budget: the byte budget is B x parameters / 8 minus what is stored raw; every tensor starts at its cheapest
   (bits, group) and the step with the most predicted KL saved per byte is bought until the budget is spent.
4. Encoding: each tensor at its width with GPTQ in the rotated basis; the real errors go in the report.
5. Optionally (``--distill STEPS``, ``rotq_distill``): the group scales tuned against the dense model's
   next-token distribution on windows of all the shipped calibration text (GPTQ reads 8,192 tokens of it),
   codes fixed.
"""

from __future__ import annotations

import heapq
import time

import numpy as np

from mmt_mlx.errors import MmtError
from mmt_mlx.fgs.codes import TensorCode, row_mask
from mmt_mlx.fgs.encoders.gauss_codes import (
    CODE_BITS,
    TRELLIS_MAX_BITS,
    WIDE_CODE_BITS,
    decode_rotq,
    encode_rotq,
    inverse_factor,
    lloyd_max,
    output_error,
    rotq_code_nbytes,
    rotq_nbytes,
)
from mmt_mlx.fgs.encoders.rotation import rotate_covariance
from mmt_mlx.fgs.encoders.trellis import tcq_distortion
from mmt_mlx.rotq_calibrate import (
    TokenImportance,
    bucket_kl,
    bucket_of,
    calibration_chunks,
    input_covariances,
    seed_of,
    tensor_class,
)
from mmt_mlx.sources import SourceModel

# presets named by what they deliver (bits per stored weight, every byte counted); measured in the README
BPW_PRESETS = {"rot4": 4.0, "rot3": 3.25, "rot2.5": 2.5}
GROUP = 64  # every matrix's width must be a multiple of it
GROUPS = (32, 64)  # group sizes the planner may choose per tensor (128 does not divide 576-wide rows)
LOG_SCALES = True  # 8-bit log-scale codes instead of f16 scales (gauss_codes): half the scale bytes
TRELLIS = True  # trellis-coded (encoders/trellis.py) instead of scalar Lloyd-Max codes
CALIB_TOKENS = 8192
DISTILL_TOKENS = 1 << 20  # distillation windows: all of the shipped calibration text (~27,000 tokens)
SCREEN_ROWS = 128
SCREEN_BITS = 3
# vocabulary rows (embedding, LM head) in bands by token importance, most important first, each at its own width:
# the top 2% of Gemma 3's 262,144 tokens hold 91% of the calibration text's next-token probability
ROW_BANDS = (0.01, 0.03, 0.12, 0.24, 0.60)
MIN_BAND_ROWS = 4096
VOCAB_CLASSES = ("embed_tokens", "lm_head")


def row_band_ids(weight: np.ndarray, fractions: tuple[float, ...] = ROW_BANDS) -> list[np.ndarray]:
    """Rows ordered by ``weight`` (largest first) and cut into bands of the given shares of the rows; each band's
    rows ascending (int32)."""
    order = np.argsort(-np.asarray(weight), kind="stable")
    cuts = np.rint(np.cumsum(fractions) / sum(fractions) * len(order)).astype(int)
    starts = np.concatenate([[0], cuts[:-1]])
    return [np.sort(order[a:b]).astype(np.int32) for a, b in zip(starts, cuts) if b > a]


def band_errors(w: np.ndarray, tc: TensorCode, h: np.ndarray | None) -> list[float]:
    """Relative output error after each level of a rotq tensor code (``TensorCode.errors``): one level, or row
    bands filled in one after another (rows not yet filled count as zero)."""
    rows = [lv.row_ids() for lv in tc.levels]
    if rows[0] is None:
        return [output_error(w, decode_rotq(tc.levels[0]), h)]
    w64 = np.asarray(w, np.float64)
    hm = np.eye(w.shape[1]) if h is None else h
    energy, err = [], []
    for lv, ids in zip(tc.levels, rows):
        wb = w64[ids]
        d = wb - decode_rotq(lv)
        energy.append(float(((wb @ hm) * wb).sum()))
        err.append(float(((d @ hm) * d).sum()))
    total = max(sum(energy), 1e-300)
    return [(sum(err[: k + 1]) + sum(energy[k + 1 :])) / total for k in range(len(rows))]


def gaussian_distortion(bits: int) -> float:
    """MSE of the Lloyd-Max quantizer of N(0, 1) at ``bits`` (numerically)."""
    c = lloyd_max(bits).astype(np.float64)
    x = np.linspace(-8, 8, 64_001)
    p = np.exp(-0.5 * x * x)
    p /= p.sum()
    q = c[np.searchsorted((c[1:] + c[:-1]) / 2, x)]
    return float((p * (x - q) ** 2).sum())


def _sample_rows(rows: int, n: int, seed: int = 0) -> np.ndarray:
    if rows <= n:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


def _screen(t: dict, ids: np.ndarray | None, share: float) -> dict:
    """The planner's item for tensor ``t["w"]`` (rows ``ids``, or all): predicted KL per (bits, group) from the
    GPTQ error at SCREEN_BITS on a row sample, scaled by the Gaussian distortion ratio, times the KL price of
    its bucket and the rows' ``share`` of it."""
    w, h, dist = t["w"], t["h"], t["dist"]
    rows = w.shape[0] if ids is None else len(ids)
    sample = _sample_rows(rows, SCREEN_ROWS)
    ws = w[sample] if ids is None else w[ids[sample]]
    cost = {}
    for g in t["groups"]:
        code = encode_rotq(ws, SCREEN_BITS, g, t["seed"], t["hr"], rotated_h=True, factor=t["u"],
                           log_scales=t["log_scales"], trellis=t["trellis"])  # fmt: skip
        e3 = output_error(ws, decode_rotq(code), h)
        cost.update({(b, g): share * t["price"] * e3 * dist[b] / dist[SCREEN_BITS] for b in dist})
    return {"tensor": t["tensor"], "ids": ids, "rows": rows, "cols": w.shape[1], "cost": cost,
            "use_h": t["use_h"], "key": t["key"]}  # fmt: skip


def _tensor_cov(name: str, keys: dict, covs: dict) -> tuple[str | None, np.ndarray | None]:
    k = keys.get(name)
    return (k, covs[k]) if k is not None else (None, None)


class _Factors:
    """Rotated covariances and GPTQ factors, one per distinct layer input (cached)."""

    def __init__(self, covs: dict, damp: float) -> None:
        self.covs, self.damp, self.hr, self.u = covs, damp, {}, {}

    def get(self, key: str | None, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if key is None:
            return None, None
        if key not in self.u:
            self.hr[key] = rotate_covariance(self.covs[key], seed)
            self.u[key] = inverse_factor(self.hr[key], self.damp)
        return self.hr[key], self.u[key]


Option = tuple[int, int]  # (bits, group size)


def allocate(
    items: dict[str, dict], budget: int, log_scales: bool = LOG_SCALES, trellis: bool = False
) -> dict[str, Option]:
    """Greedy knapsack: items[name] = {"rows", "cols", "cost": {(bits, group): predicted KL}} -> the option
    chosen per tensor. Each tensor starts at its fewest bytes; a step moves it to whichever option saves the most
    predicted KL per extra byte."""

    def nbytes(it: dict, o: Option) -> int:
        return rotq_nbytes(it["rows"], it["cols"], o[0], o[1], log_scales, trellis)

    choice = {
        n: min(it["cost"], key=lambda o, it=it: (nbytes(it, o), it["cost"][o])) for n, it in items.items()
    }
    spent = sum(nbytes(items[n], o) for n, o in choice.items())
    if spent > budget:
        raise MmtError(
            f"the budget ({budget / 1e6:.2f} MB for codes) is below the fewest bits' floor ({spent / 1e6:.2f} MB)"
        )

    def step(n: str):
        it, cur = items[n], choice[n]
        base, c0 = nbytes(it, cur), it["cost"][cur]
        best = None
        for o, c in it["cost"].items():
            extra, gain = nbytes(it, o) - base, c0 - c
            if extra > 0 and gain > 0 and (best is None or gain / extra > best[0]):
                best = (gain / extra, o, extra)
        return None if best is None else (-best[0], n, best[1], best[2])

    heap = [s for s in (step(n) for n in items) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, n, nb, extra = heapq.heappop(heap)
        if spent + extra > budget:
            continue  # a cheaper step elsewhere may still fit
        choice[n], spent = nb, spent + extra
        s = step(n)
        if s is not None:
            heapq.heappush(heap, s)
    return choice


def encode_bpw(
    src: SourceModel,
    bpw: float,
    *,
    progress: bool = True,
    source_name: str = "",
    calib_tokens: int = CALIB_TOKENS,
    damp: float = 0.01,
    embed_gptq: bool = True,
    preset: str | None = None,
    distill_steps: int = 0,
    groups: tuple[int, ...] = GROUPS,
    log_scales: bool = LOG_SCALES,
    trellis: bool = TRELLIS,
    row_bands: bool = True,
) -> dict:
    """Encode every 2-D weight as a rotq level so the stored model has <= ``bpw`` bits per weight
    (``groups``: the group sizes the planner may choose; ``log_scales``: 8-bit log-scale codes, else f16;
    ``trellis``: trellis-coded instead of scalar Gaussian codes; ``row_bands``: vocabulary rows in bands of their
    own widths by token importance, else coded whole)."""
    from tqdm import tqdm

    from mmt_mlx.build import model_from_source

    if not 1.0 < bpw < 16:
        raise MmtError("--bpw must be between 1 and 16")
    t0 = time.perf_counter()
    matrices = {k: v for k, v in src.weights.items() if v.ndim == 2}
    raw = {k: v for k, v in src.weights.items() if v.ndim != 2}
    for n, w in matrices.items():
        if w.shape[1] % GROUP:
            raise MmtError(f"{n}: {w.shape[1]} columns is not a multiple of the group size {GROUP}")
    params = sum(int(v.size) for v in src.weights.values())
    budget = int(bpw * params / 8) - sum(int(a.nbytes) for a in raw.values())

    # 1. calibration
    lm = model_from_source(src, source_name or "source")
    ctx = min(512, int(src.config.get("max_position_embeddings", 512)))
    chunks = calibration_chunks(lm.tokenizer, calib_tokens, ctx)
    importance = TokenImportance() if row_bands else None
    keys, covs = input_covariances(lm.model, chunks, on_logits=importance)
    n_layers = 1 + max((int(k.split(".")[k.split(".").index("layers") + 1]) for k in matrices if "layers" in k.split(".")), default=0)  # fmt: skip
    buckets: dict[str, list[str]] = {}
    for n in matrices:
        buckets.setdefault(bucket_of(n, n_layers), []).append(n)
    seeds = {n: seed_of(keys.get(n, n)) for n in matrices}
    coarse, rtn_err = {}, {}
    for n, w in matrices.items():  # coarse codes without error feedback: the probe of each bucket's price
        c = decode_rotq(encode_rotq(w, SCREEN_BITS, GROUP, seeds[n], None, log_scales=log_scales))
        _, h = _tensor_cov(n, keys, covs)
        rtn_err[n] = output_error(w, c, h)
        coarse[n] = c
    t_cov = time.perf_counter() - t0
    kl = bucket_kl(lm.model, matrices, coarse, buckets, chunks[0][: min(256, ctx)])
    del coarse, lm
    t_cal = time.perf_counter() - t0

    # 2. screening: GPTQ error at SCREEN_BITS per group size on a row sample, other widths by the Gaussian
    # distortion ratio; vocabulary rows in bands by token importance, each band priced by its share
    fac = _Factors(covs, damp)
    # codes wider than the trellis takes only where the target is above it (every narrower target plans as before)
    offered = CODE_BITS + (WIDE_CODE_BITS if bpw > TRELLIS_MAX_BITS else ())
    dist = {
        b: tcq_distortion(b) if trellis and b <= TRELLIS_MAX_BITS else gaussian_distortion(b) for b in offered
    }
    items: dict[str, dict] = {}
    parts: dict[str, list[str]] = {}  # tensor -> its items (one, or one per row band)
    whole: dict[str, dict] = {}  # banded tensors screened whole too: the plan that sets each band's floor
    omega = importance.weights() if importance is not None else None
    for n, w in matrices.items():
        key, h = _tensor_cov(n, keys, covs)
        use_h = h is not None and (embed_gptq or "embed" not in n)
        hr, u = fac.get(key, seeds[n]) if use_h else (None, None)
        b = bucket_of(n, n_layers)
        price = kl[b] / max(sum(rtn_err[m] for m in buckets[b]), 1e-30)  # KL per unit of output error
        t = {"tensor": n, "w": w, "h": h, "hr": hr, "u": u, "seed": seeds[n], "price": price, "use_h": use_h,
             "key": key, "groups": groups, "dist": dist, "log_scales": log_scales, "trellis": trellis}  # fmt: skip
        vocab_rows = omega is not None and tensor_class(n) in VOCAB_CLASSES and w.shape[0] == len(omega)
        if not (vocab_rows and w.shape[0] >= MIN_BAND_ROWS):
            items[n], parts[n] = _screen(t, None, 1.0), [n]
            continue
        whole[n] = _screen(t, None, 1.0)
        wh = w if h is None else w @ h.astype(np.float32)
        weighted = omega * np.einsum("ij,ij->i", wh, w, dtype=np.float64)  # importance x output energy
        parts[n] = []
        for k, ids in enumerate(row_band_ids(omega)):
            items[f"{n}#{k}"] = _screen(t, ids, float(weighted[ids].sum() / max(weighted.sum(), 1e-300)))
            parts[n].append(f"{n}#{k}")
    if whole:  # no band below the width its tensor gets when coded whole: rows of tokens the calibration text
        # rarely uses (code, other languages) lose nothing against the whole-tensor plan
        plan = allocate(
            {k: v for k, v in items.items() if v["ids"] is None} | whole, budget, log_scales, trellis
        )
        for n in whole:
            for name in parts[n]:
                items[name]["cost"] = {o: c for o, c in items[name]["cost"].items() if o[0] >= plan[n][0]}
    masks = sum(len(parts[n]) * ((w.shape[0] + 7) // 8) for n, w in matrices.items() if len(parts[n]) > 1)
    choice = allocate(items, budget - masks, log_scales, trellis)
    t_screen = time.perf_counter() - t0

    # 3. encoding
    codes: dict[str, TensorCode] = {}
    bar = tqdm(matrices.items(), desc="encoding", unit="tensor", disable=not progress, leave=False)
    for n, w in bar:
        levels = []
        for name in parts[n]:
            it = items[name]
            hr, u = fac.get(it["key"], seeds[n]) if it["use_h"] else (None, None)
            bits, g = choice[name]
            ids = it["ids"]
            code = encode_rotq(
                w if ids is None else w[ids], bits, g, seeds[n], hr, rotated_h=True, factor=u,
                log_scales=log_scales, trellis=trellis,
            )  # fmt: skip
            if ids is not None:
                code.row_mask, code.tensor_rows = row_mask(ids, w.shape[0]), w.shape[0]
            levels.append(code)
        _, h = _tensor_cov(n, keys, covs)
        codes[n] = TensorCode(tuple(w.shape), levels, [], None)
        codes[n].errors = band_errors(w, codes[n], h)
    t_enc = time.perf_counter() - t0
    distilled = None
    if distill_steps > 0:  # 5. optional: the group scales tuned against the dense model's distribution
        from mmt_mlx.rotq_distill import distill_scales

        distilled = distill_scales(
            lambda: model_from_source(src, source_name or "source").model, codes,
            calibration_chunks(src.tokenizer, DISTILL_TOKENS, ctx), distill_steps, progress=progress,
        )  # fmt: skip
        for n, w in matrices.items():  # the report states the errors of the stored codes
            _, h = _tensor_cov(n, keys, covs)
            codes[n].errors = band_errors(w, codes[n], h)
    report = rotq_report(
        src, codes, raw, items, parts, kl, bpw, preset, time.perf_counter() - t0, t_cal, source_name
    )
    if distilled is not None:
        report["distill"] = distilled
    report["calibration_tokens"] = sum(len(c) for c in chunks)
    report["stage_seconds"] = {"covariances_and_probe_codes": round(t_cov, 1), "sensitivity": round(t_cal - t_cov, 1),
                               "screening": round(t_screen - t_cal, 1), "encoding": round(t_enc - t_screen, 1),
                           "distillation": round(report["seconds"] - t_enc, 1)}  # fmt: skip
    return codes, raw, report


def rotq_report(src, codes, raw, items, parts, kl, bpw, preset, seconds, calib_seconds, source_name) -> dict:
    """Per tensor class: levels kept (rotq<bits>g<group> counts, tcq<bits>g<group> for trellis codes, a row band
    counting as one), bytes, mean output error, predicted KL."""
    classes: dict[str, dict] = {}
    for name, tc in codes.items():
        c = classes.setdefault(tensor_class(name), {"tensors": 0, "params": 0, "bytes": 0, "levels": {},
                                                    "r2": {}, "errors": [], "predicted_kl": 0.0})  # fmt: skip
        c["tensors"] += 1
        c["params"] += int(np.prod(tc.shape))
        c["errors"].append(tc.errors[-1])
        for lv, item in zip(tc.levels, parts[name]):
            key = f"{'tcq' if lv.trellis else 'rotq'}{lv.bits}g{lv.group_size}"
            c["bytes"] += rotq_code_nbytes(lv)
            c["levels"][key] = c["levels"].get(key, 0) + 1
            c["predicted_kl"] += items[item]["cost"][(lv.bits, lv.group_size)]
        if len(tc.levels) > 1:
            c["row_bands"] = [{"rows": lv.rows, "level": f"{'tcq' if lv.trellis else 'rotq'}{lv.bits}g{lv.group_size}",
                               "bits_per_weight": round(8 * rotq_code_nbytes(lv) / (lv.rows * lv.cols), 3)}
                              for lv in tc.levels]  # fmt: skip
    for c in classes.values():
        c["bits_per_weight"] = 8 * c["bytes"] / c["params"]
        c["r2"] = {"rotq": float(1 - np.mean(c["errors"]))}  # share of the output energy kept
        c["mean_output_error"] = float(np.mean(c.pop("errors")))
    coded = sum(c["bytes"] for c in classes.values())
    raw_bytes = sum(int(a.nbytes) for a in raw.values())
    params = sum(c["params"] for c in classes.values()) + sum(int(a.size) for a in raw.values())
    total = coded + raw_bytes
    trellis = any(lv.trellis for tc in codes.values() for lv in tc.levels)
    codes_name = "4-state trellis-coded Gaussian codes" if trellis else "Gaussian Lloyd-Max codes"
    return {
        "source": source_name or src.path, "arch": src.arch, "tau": None, "bpw_target": bpw, "preset": preset,
        "method": f"rotq: FFT rotation + {codes_name} + GPTQ, bits by measured KL per byte",
        "classes": classes, "bucket_kl_at_3bit_rtn": kl, "coded_bytes": coded, "raw_bytes": raw_bytes,
        "stored_bytes": total, "parameters": params, "bits_per_weight": 8 * total / params,
        "ratio_to_fp16": 2 * params / total, "source_bytes": src.weight_bytes,
        "ratio_to_source": src.weight_bytes / total, "seconds": round(seconds, 1),
        "calibration_seconds": round(calib_seconds, 1),
    }  # fmt: skip
