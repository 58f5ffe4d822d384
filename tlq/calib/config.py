"""Typed configuration of a calibration run, and the registry of methods.

TLQ = token importance x importance-weighted solver x quantization exposure: each method
below is one choice on those three axes (plus optional input scaling), so ablations are
just other choices (`--importance`, `--exposure` on the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from tlq.errors import TLQError
from tlq.quant.qparams import SymmetricGrid
from tlq.quant.scale_search import ScaleSearchSpec
from tlq.quant.solvers import SOLVERS
from tlq.schemes import QuantScheme

IMPORTANCE_MODES = ("uniform", "modality", "modality_prior", "token")
EXPOSURE_MODES = ("fp", "quantized", "corrected")
SCALING_MODES = ("none", "awq", "smoothquant", "auto")
GRADIENT_STATISTICS = ("abs", "square")
GRADIENT_SOURCES = ("block", "linear")


@dataclass(frozen=True)
class ImportanceConfig:
    """How per-token gradient magnitudes become calibration weights (tlq/calib/importance.py).

    Attributes:
        mode: uniform (all 1); modality (MBQ: answer 1, vision r = g_vis/g_ans floored at the
            median over layers, prompt 0); modality_prior (TLQ's prior term alone);
            token (TLQ: prior mixed with the token's own gradient).
        statistic: how a token's output gradient g [C] becomes a number: "abs" mean_c |g_c|
            (MBQ) or "square" mean_c g_c^2 (the Fisher / Taylor weight, VLMQ's G^2).
        source: whose output gradient weights a linear group's tokens: "block" (the attention
            or MLP output) or "linear" (each linear's own output, averaged over the group; K and V
            at token t then count by their effect on the later tokens that read them).
        prior_mix: lambda, the share of the modality prior in a token's score (token mode).
        iqr_clip: k of the outlier fence [Q1 - k IQR, Q3 + k IQR], taken per modality over the
            tokens that received gradient.
        floor: minimum weight after mean-1 normalisation (keeps near-zero-gradient tokens alive).
        drop_below: tokens whose final weight is below this leave the calibration set (0 = keep all).
        max_tokens: keep at most this many tokens per layer (seeded sample; None = all).
    """

    mode: str = "token"
    statistic: str = "abs"
    source: str = "block"
    prior_mix: float = 0.5
    iqr_clip: float = 1.5
    floor: float = 0.1
    drop_below: float = 0.0
    max_tokens: int | None = None

    def __post_init__(self):
        if self.statistic not in GRADIENT_STATISTICS:
            raise TLQError(f"unknown gradient statistic {self.statistic!r}; choose one of {', '.join(GRADIENT_STATISTICS)}")
        if self.source not in GRADIENT_SOURCES:
            raise TLQError(f"unknown gradient source {self.source!r}; choose one of {', '.join(GRADIENT_SOURCES)}")


@dataclass(frozen=True)
class MethodSpec:
    """One calibration method as a choice on each axis.

    Attributes:
        name: registry / CLI name.
        summary: one line for `tlq calibrate --help` and the README.
        importance: token weighting mode (see ImportanceConfig.mode).
        input_scaling: none | awq (grid-searched per-channel input scales) | smoothquant |
            auto (awq for schemes that quantize activations, none for weight-only ones).
        scale_search: how the awq input scaling searches (loss, block output, statistic, duo
            scaling; tlq.quant.scale_search.ScaleSearchSpec).
        clip_search: AWQ weight clipping before rounding (never of the q/k projections).
        solver: a key of tlq.quant.solvers.SOLVERS: rtn | gptq (the importance-weighted GPTQ when
            weights are not uniform).
        exposure: fp (calibrate on the float model's inputs), quantized (on the inputs the
            quantized earlier layers produce), corrected (quantized inputs, FP outputs as target).
        damp: default GPTQ damping of this method (fraction of the Hessian's mean diagonal; also
            the ridge of the exposure target), used when CalibConfig.damp is not given.
        damp_candidates: dampings each linear group chooses among by two-fold cross-validation over
            the calibration samples (tlq/calib/held_out_damping.py); empty: `damp` everywhere. Used
            when CalibConfig.damp_candidates is not given.
        exposure_strength: default share of the corrected-exposure shift W* - W that is applied
            (0..1), used when CalibConfig.exposure_strength is not given.
        grid: how symmetric schemes turn a group's absmax into its scale, as the method's reference
            code does (tlq.quant.qparams.SymmetricGrid); the run's scheme carries it.
    """

    name: str
    summary: str
    importance: str = "uniform"
    input_scaling: str = "none"
    scale_search: ScaleSearchSpec = field(default_factory=ScaleSearchSpec)
    clip_search: bool = False
    solver: str = "rtn"
    exposure: str = "quantized"
    damp: float = 0.01
    damp_candidates: tuple[float, ...] = ()
    exposure_strength: float = 1.0
    grid: SymmetricGrid = SymmetricGrid.FULL

    @property
    def needs_data(self) -> bool:
        """Whether any axis reads calibration inputs (RTN without scaling or clipping does not)."""
        solver = SOLVERS.get(self.solver)
        return (solver is None or solver.needs_data or self.clip_search or self.input_scaling != "none"
                or self.importance != "uniform")

    @property
    def needs_gradients(self) -> bool:
        return self.importance != "uniform"


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("rtn", "round-to-nearest, no calibration data", exposure="fp"),
    MethodSpec("gptq", "GPTQ on the quantized layers' outputs (sequential, like llm-compressor)", solver="gptq"),
    # The baselines as their code ships them (AutoAWQ / llm-awq, mit-han-lab/smoothquant, thu-nics/MBQ):
    # statistics and losses on the float model's layer inputs, block-output loss, MBQ without clipping.
    # AWQ and MBQ round on their pseudo_quantize_tensor's grid (absmax / (2**(b-1) - 1)); rtn, gptq,
    # tlq and smoothquant on IST-DASLab's / compressed-tensors' (absmax / ((2**b - 1) / 2)):
    # SmoothQuant's own fake_quant.py ships 8-bit weights only, and the 4-bit rows it is compared
    # with (llm-compressor: SmoothQuantModifier, then QuantizationModifier) round on that grid.
    MethodSpec("awq", "AWQ: activation-aware input scales and weight clipping, then RTN",
               input_scaling="awq", clip_search=True, exposure="fp", grid=SymmetricGrid.RESTRICTED),
    MethodSpec("smoothquant", "SmoothQuant (alpha 0.5) input smoothing, then RTN; for w4a8",
               input_scaling="smoothquant", exposure="fp"),
    MethodSpec("mbq", "MBQ: modality-balanced gradient-weighted scale search (weighted MAE), then RTN",
               importance="modality", input_scaling="awq", scale_search=ScaleSearchSpec(loss="mae"), exposure="fp",
               grid=SymmetricGrid.RESTRICTED),
    # damp 0.1 and half the exposure shift: token weights lower the effective number of calibration
    # tokens and W* is a K x K regression on them; both were chosen on the validation split of the
    # trained fixtures (docs/quality.md), where the undamped defaults overfit the calibration tokens.
    # AWQ input scaling (token-weighted) before the solver for every scheme: GPTQ cannot undo the
    # coarse steps that outlier weight columns force on their groups (validation split, fixtures
    # with outlier channels); on the plain fixtures it costs little.
    MethodSpec("tlq", "TLQ: gradient token importance, weighted scale search and GPTQ, quantization-exposed "
               "with FP target", importance="token", input_scaling="awq", solver="gptq", exposure="corrected",
               scale_search=ScaleSearchSpec(block_loss=False, weighted_statistic=True, judge="solver"), damp=0.1,
               exposure_strength=0.5),
)}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise TLQError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


@dataclass
class CalibConfig:
    """Everything `tlq calibrate` needs.

    Attributes:
        model: local folder of the float model.
        out: checkpoint folder to write.
        method: the method (axes above), possibly with CLI overrides applied.
        scheme: numerics (tlq.schemes); its grid is set to the method's (MethodSpec.grid).
        calib: calibration JSONL (None = the bundled set).
        max_samples: use at most this many samples (None = all).
        seed: seeds sampling and every random choice; same seed, same checkpoint.
        device: where the layer being calibrated runs (cpu or cuda); the rest stays on CPU.
        act_order: GPTQ act-order (writes g_idx; the plugin reorders inputs so kernels still apply).
        damp: GPTQ damping, as a fraction of the Hessian's mean diagonal (None = the method's default);
            with damp_candidates, what a group falls back to when it cannot hold samples out.
        damp_candidates: dampings each group chooses among on held-out samples (None = the method's
            default; () = `damp` everywhere; tlq/calib/held_out_damping.py).
        exposure_strength: blend of the FP-target correction (corrected exposure), 0..1
            (None = the method's default).
        smoothquant_alpha: migration strength for smoothquant scaling.
        n_grid: grid points of the AWQ/MBQ scale search.
        batch_tokens: tokens per batch when a group's inputs are streamed into its statistics (memory
            of one batch: batch_tokens x K fp32; the statistics do not grow with calibration tokens).
        search_tokens: tokens the scale and clipping searches see (whole samples, an importance-weighted
            seeded draw when the calibration set is larger; recorded in the manifest).
        judge_rows: r, the output rows per linear that TLQ's in-loop scale search reads: a linear with
            more than 2r rows is judged on r seeded rows (and its grid scored on 2r) before the winner is
            solved in full; a group whose linears all have at most 2r rows is judged on every row
            (tlq/calib/solved_scaling.py; recorded in the manifest).
        max_pixels: calibration images above this many pixels are downscaled (aspect kept) before the
            processor (tlq/data/processing.py); None keeps the processor's own bound (Qwen2-VL:
            its max_pixels, 12,845,056 in Qwen2-VL-7B-Instruct's preprocessor config; LLaVA-OneVision:
            anyres_max_9, the base image plus at most 9 tiles' worth of features).
        host_memory: GiB of host RAM a process may use beyond the weights it holds; the hidden-state
            streams (4 x tokens x hidden in the model's dtype, more on a pipeline stage that computes FP
            targets ahead) are spilled to files in the work folder when they would take more than half
            of it (tlq/calib/streams.py: the rest is what never spills).
        importance: token weighting (ImportanceConfig).
        work_dir: resumable per-layer results (default: a hidden sibling of `out`).
        overwrite: replace an existing `out`.
        resume: continue from `work_dir` when it holds results of the same run.
        stages: layer stages for multi-rank runs (None = all layers in this process).
    """

    model: Path
    out: Path
    method: MethodSpec
    scheme: QuantScheme
    calib: Path | None = None
    max_samples: int | None = None
    seed: int = 0
    device: str = "cpu"
    act_order: bool = False
    damp: float | None = None
    damp_candidates: tuple[float, ...] | None = None
    exposure_strength: float | None = None
    smoothquant_alpha: float = 0.5
    n_grid: int = 20
    batch_tokens: int = 8192
    search_tokens: int = 4096
    judge_rows: int = 512
    host_memory: float = 16.0
    max_pixels: int | None = None
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    work_dir: Path | None = None
    overwrite: bool = False
    resume: bool = True

    def __post_init__(self):
        self.model, self.out = Path(self.model), Path(self.out)
        if self.method.importance != self.importance.mode:
            self.importance = replace(self.importance, mode=self.method.importance)
        if self.scheme.grid != self.method.grid:  # the method's reference grid (MethodSpec.grid)
            self.scheme = replace(self.scheme, grid=self.method.grid)
        if self.method.solver not in SOLVERS:
            raise TLQError(f"unknown solver {self.method.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.method.exposure not in EXPOSURE_MODES:
            raise TLQError(f"unknown exposure {self.method.exposure!r}; choose one of {', '.join(EXPOSURE_MODES)}")
        if self.method.input_scaling not in SCALING_MODES:
            raise TLQError(f"unknown input scaling {self.method.input_scaling!r}; "
                           f"choose one of {', '.join(SCALING_MODES)}")
        if self.importance.mode not in IMPORTANCE_MODES:
            raise TLQError(f"unknown importance {self.importance.mode!r}; choose one of {', '.join(IMPORTANCE_MODES)}")
        if self.importance.drop_below > 0 and self.importance.mode == "uniform":
            raise TLQError(f"--drop-below needs token weights, but method {self.method.name} weighs every token "
                           "the same; drop the flag or choose token weights (--importance token)")
        if self.importance.max_tokens is not None and not self.method.needs_data:
            raise TLQError(f"--max-tokens has nothing to select: method {self.method.name} reads no calibration "
                           "tokens; drop the flag")
        if self.work_dir is None:
            self.work_dir = self.out.resolve().parent / f".{self.out.name}.work"
        if self.damp is None:
            self.damp = self.method.damp
        if self.exposure_strength is None:
            self.exposure_strength = self.method.exposure_strength
        if self.damp_candidates is None:
            self.damp_candidates = self.method.damp_candidates
        self.damp_candidates = tuple(float(d) for d in self.damp_candidates)
        if any(not d > 0 for d in self.damp_candidates):
            raise TLQError(f"damp candidates must be positive, not {self.damp_candidates}")
        if len(self.damp_candidates) > 1 and self.method.solver != "gptq":
            raise TLQError(f"damp candidates need a GPTQ solver, and method {self.method.name} rounds with "
                           f"{self.method.solver}; drop --damp-candidates")
        for name in ("batch_tokens", "search_tokens", "judge_rows"):
            if getattr(self, name) < 1:
                raise TLQError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise TLQError(f"--max-pixels must be at least 1, not {self.max_pixels}; "
                           "omit it for the processor's own bound")
        if not self.host_memory >= 0:
            raise TLQError(f"--host-memory must be a number of GiB >= 0, not {self.host_memory}")
        if not self.damp > 0:
            raise TLQError(f"damp must be positive, not {self.damp}; GPTQ's usual value is 0.01")
        if not 0.0 <= self.exposure_strength <= 1.0:
            raise TLQError(f"exposure strength {self.exposure_strength} is outside [0, 1]")

    def run_key(self) -> dict:
        """What must match for a resumed run to continue an earlier one."""
        return {"model": str(self.model.resolve()), "method": self.method.__dict__, "scheme": self.scheme.__dict__,
                "calib": str(self.calib), "max_samples": self.max_samples, "seed": self.seed,
                "act_order": self.act_order, "damp": self.damp,
                "damp_candidates": list(self.damp_candidates), "exposure_strength": self.exposure_strength,
                "importance": self.importance.__dict__, "smoothquant_alpha": self.smoothquant_alpha,
                "n_grid": self.n_grid, "search_tokens": self.search_tokens, "judge_rows": self.judge_rows,
                "batch_tokens": self.batch_tokens, "max_pixels": self.max_pixels}
