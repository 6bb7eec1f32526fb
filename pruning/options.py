"""Every pruning option, profile and default, once; importable without torch.

    resolve_options(options)   # persona-pruner's options over its profile, counts checked
    learn_config(opts, seed)   # the mask-learning config of resolved options (values checked)
    check_options(method, o)   # what any method accepts (its data options + LoRA recovery)
    validate_request_options(o)  # the HTTP API's check of a request's options (no server-side keys)
    job_tokens(o)              # a bound on the work those options ask for (the API caps it)

The persona-pruner options are in `OPTIONS`; the mask learner's are `MaskLearnConfig`'s fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace

from pruning import PruneError, check_number

DEFAULT_METHOD = "persona-pruner"
DEFAULT_PROFILE = "default"
DEFAULT_SPARSITY = 0.25
MAX_SPARSITY = 0.9
# every registered method (pruning.methods.METHODS holds their functions; a test keeps the two equal)
METHOD_NAMES = ("random", "magnitude", "activation", "activation-prompt", "taylor", "depth",
                "persona-pruner", "activation-persona")
# the methods that build (or reuse) the persona's synthetic set and so take the options below
DATA_METHODS = ("persona-pruner", "activation-persona")

# -- mask learning -----------------------------------------------------------------------

VARIANTS = ("ste", "gumbel", "soft-topk")
INITS = ("act-fisher", "activation", "fisher", "magnitude", "random")


@dataclass(frozen=True)
class MaskLearnConfig:
    steps: int = 60
    batch_size: int = 8
    lr: float = 0.05
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    rkl_weight: float = 0.0           # reverse KL(masked || dense), mode-seeking, beside the forward one
    variant: str = "ste"
    ste_grad: str = "identity"        # "identity" | "sigmoid"
    temperature: float = 0.5          # gumbel / soft-topk / sigmoid-STE slope, in score units
    kl_topk: int = 64                 # dense distribution kept as top-K + tail bucket
    init: str = "act-fisher"          # "act-fisher" | "activation" | "fisher" | "magnitude" | "random"
    fisher_weight: float = 0.5        # act-fisher: weight of the Fisher z-scores vs activation z-scores
    fisher_target: str = "answer"     # "answer" (empirical Fisher) | "sampled" (tokens drawn from dense)
    weight_decay: float = 0.0
    # gradients through the system prompt's keys/values too (the persona prompt is most of the
    # context: 170-515 tokens in the eval personas); False reuses a no-grad prefix per step
    prefix_grad: bool = False
    # after the mask's steps, this many steps learn a real scale per kept channel (init 1) with the
    # mask fixed: it restores FFN output the dropped channels took away; export folds it into
    # down_proj's columns (0: the plain mask)
    scale_steps: int = 0
    scale_lr: float = 0.01
    # "cosine": each phase's learning rate decays to 0 over its steps
    lr_schedule: str = "constant"
    # > 0: this share of the examples is held out; their KL under the current mask is checked every
    # `eval_every` steps and the best mask (and scales) seen is the one returned (early stopping)
    holdout: float = 0.0
    eval_every: int = 4
    # > 0: at step `on_policy_at` (-1: when the mask phase ends) the masked model answers this many
    # of the training prompts itself (greedy, up to `on_policy_tokens`); those answers, with the
    # dense model's distributions on them, join the examples of every later step
    on_policy: int = 0
    on_policy_at: int = -1
    on_policy_tokens: int = 96
    seed: int = 0
    max_length: int = 512

    def __post_init__(self):  # a bad option fails before any data is built (and is a 400 in the API)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "float"):
                check_number(f.name, v, *_RANGES.get(f.name, (-math.inf, math.inf)), integer=f.type == "int")
            elif f.type == "bool" and not isinstance(v, bool):
                raise PruneError(f"option {f.name} must be true or false, got {v!r}")
        for name, allowed in (("variant", VARIANTS), ("ste_grad", ("identity", "sigmoid")), ("init", INITS),
                              ("fisher_target", ("answer", "sampled")), ("lr_schedule", ("constant", "cosine"))):
            if getattr(self, name) not in allowed:
                raise PruneError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")


# bounds a caller may set: step counts a worker finishes in hours, not weeks
_RANGES = {"steps": (0, 5000), "scale_steps": (0, 5000), "batch_size": (1, 256), "kl_topk": (1, 4096),
           "max_length": (16, 8192), "lr": (0, 10), "scale_lr": (0, 10), "ce_weight": (0, 100),
           "kl_weight": (0, 100), "rkl_weight": (0, 100), "holdout": (0, 0.5), "eval_every": (1, 1000),
           "on_policy": (0, 4096), "on_policy_at": (-1, 5000), "on_policy_tokens": (1, 1024),
           "temperature": (0, 100), "fisher_weight": (0, 1), "weight_decay": (0, 10), "seed": (0, 2**32 - 1)}

# -- profiles ----------------------------------------------------------------------------

PROFILES: dict[str, dict] = {
    # tests: seconds
    "fast": dict(n_instructions=8, pool_size=48, n_references=2, max_new_tokens=24,
                 learn=dict(steps=6, batch_size=4, lr=0.05, scale_steps=4)),
    # the service default: a few minutes on 2 CPU cores
    # 256 answers come from a vLLM teacher in ~1.5 min (teacher_backend auto); 256 beat 64 by
    # 4 % persona / 8 % general KL (docs/quality_experiments.md)
    # then 32 steps of per-channel scales on the fixed mask: -4 to -5 % persona KL, -3 to -4 %
    # general, 70-120 s (docs/quality_experiments.md)
    # data_tokens: fewer instructions behind a persona prompt over ~550 tokens (every stage runs
    # the whole prompt per example), so that a 1,000-token persona still prunes in under 10 minutes
    "default": dict(n_instructions=256, pool_size=512, n_references=8, max_new_tokens=64, data_tokens=170_000,
                    learn=dict(steps=16, batch_size=8, lr=0.05, scale_steps=32)),
    # twice the default's data over the whole pool and all references, longer answers, 2 epochs:
    # -3.5 / -9.8 % persona KL on personas 0 and 3, general level, ~19 min per persona
    # (docs/quality_experiments.md)
    "thorough": dict(n_instructions=512, pool_size=None, n_references=None, max_new_tokens=96,
                     learn=dict(steps=128, batch_size=8, lr=0.03, scale_steps=64)),
}


def profile(name: str) -> dict:
    try:
        p = PROFILES[name]
    except KeyError:
        raise PruneError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
    return {**p, "learn": dict(p["learn"])}


def config_for(profile_name: str, **overrides) -> MaskLearnConfig:
    cfg = MaskLearnConfig(**profile(profile_name)["learn"])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# -- persona-pruner's options -----------------------------------------------------------------

LEARN_KEYS = {f.name for f in fields(MaskLearnConfig)} - {"seed"}
# every option a caller may set in ctx.options (profile values are the defaults)
OPTIONS = {
    "profile", "n_instructions", "pool_size", "n_references", "band", "max_new_tokens",
    "teacher_url", "teacher_model", "teacher_temperature", "gen_batch_size", "sens_batch_size",
    "pool_path", "references_path", "pool_calibration", "teacher_backend", "center", "n_anchor", "compute_dtype", "use_cache", "log_every", "relative",
    "data_tokens", "extra_instructions", "samples", "sample_temperature",
    *LEARN_KEYS,
}
MAX_EXTRA_INSTRUCTIONS = 64  # questions always in the data, beside the filtered ones (a card's lore)
# LoRA recovery after any method (`--recover`), and its defaults
RECOVERY_OPTIONS = {"recover", "lora_steps", "lora_rank", "lora_lr"}
RECOVERY_DEFAULTS = {"lora_steps": 30, "lora_rank": 8, "lora_lr": 5e-4}
# options only the server itself may set: paths on its disks, outbound URLs
SERVER_ONLY_OPTIONS = {"pool_path", "references_path", "teacher_url", "cache_dir"}
MAX_REQUEST_OPTIONS_CHARS = 4096

# the data options a caller may set, and their bounds (None allowed where the profile uses it)
_COUNTS = {"n_instructions": (0, 4096), "pool_size": (1, 100_000), "n_references": (1, 1000),
           "max_new_tokens": (1, 1024), "gen_batch_size": (1, 256), "sens_batch_size": (1, 1024),
           "n_anchor": (0, 1024), "data_tokens": (1000, 100_000_000), "samples": (1, 64)}


def resolve_options(options: dict | None) -> dict:
    """persona-pruner's `options` over their profile's values and the defaults, counts checked."""
    opts = dict(options or {})
    unknown = set(opts) - OPTIONS
    if unknown:
        raise PruneError(f"unknown persona-pruner options: {', '.join(sorted(unknown))}")
    prof = profile(opts.get("profile") or DEFAULT_PROFILE)
    learn = prof.pop("learn")
    out = {"profile": opts.get("profile") or DEFAULT_PROFILE, "band": None, "teacher_url": None,
           "teacher_model": None, "teacher_temperature": 0.0, "gen_batch_size": 16, "sens_batch_size": 64,
           "pool_path": None, "references_path": None, "pool_calibration": True, "center": True, "n_anchor": 0,
           # the persona's own topics, not the questions every persona moves (docs/quality_experiments.md)
           "relative": True,
           "compute_dtype": "auto", "use_cache": True, "teacher_backend": "auto",
           "log_every": 0, "extra_instructions": [],
           # answers per instruction: the first as the teacher writes it, the others sampled
           "samples": 1, "sample_temperature": 0.8, **prof, **learn}
    out.update({k: v for k, v in opts.items() if v is not None or k in ("pool_size", "n_references")})
    if out["teacher_url"]:
        # an external teacher's answers are the target: cross-entropy on them (KL to the base's own
        # distribution would learn the base back and throw the teacher's rewrite away); either
        # weight may still be set, e.g. kl_weight for CE plus KL
        out.setdefault("ce_weight", 1.0)
        out.setdefault("kl_weight", 0.0)
    _check_counts(out)
    return out


def learn_config(opts: dict, seed: int = 0) -> MaskLearnConfig:
    """The mask-learning config of resolved options: the profile's, with the caller's knobs."""
    return config_for(opts["profile"], **{key: opts[key] for key in LEARN_KEYS if key in opts}, seed=seed)


def _check_counts(opts: dict) -> None:
    for name, (lo, hi) in _COUNTS.items():
        if opts.get(name) is not None or name not in ("pool_size", "n_references", "data_tokens"):
            check_number(name, opts.get(name), lo, hi, integer=True)
    check_number("teacher_temperature", opts.get("teacher_temperature"), 0, 2)
    check_number("sample_temperature", opts.get("sample_temperature"), 0, 2)
    extra = opts.get("extra_instructions")
    if extra is not None and (not isinstance(extra, list) or len(extra) > MAX_EXTRA_INSTRUCTIONS
                              or not all(isinstance(q, str) and 0 < len(q.strip()) <= 500 for q in extra)):
        raise PruneError(f"option extra_instructions must be a list of at most {MAX_EXTRA_INSTRUCTIONS} "
                         "non-empty strings of at most 500 characters")


def check_options(method: str, options: dict) -> None:
    """The option names any method accepts, and the recovery options' values."""
    unknown = set(options) - OPTIONS - RECOVERY_OPTIONS
    if unknown:
        raise PruneError(f"unknown options for {method}: {', '.join(sorted(unknown))}")
    if "recover" in options and not isinstance(options["recover"], bool):
        raise PruneError(f"option recover must be true or false, got {options['recover']!r}")
    for name, lo, hi, integer in (("lora_steps", 1, 5000, True), ("lora_rank", 1, 256, True),
                                  ("lora_lr", 0, 1, False)):
        if options.get(name) is not None:
            check_number(name, options[name], lo, hi, integer=integer)


def job_tokens(options: dict | None) -> int:
    """A bound on the tokens a create's options make a worker process: the learning (and LoRA)
    steps over their batches, plus the teacher's answers and their prompts, plus the masked
    model's own answers (`on_policy`)."""
    opts = dict(options or {})
    recover = {k: opts.pop(k, RECOVERY_DEFAULTS.get(k)) for k in RECOVERY_OPTIONS}
    res = resolve_options(opts)
    cfg = learn_config(res)
    steps = cfg.steps + cfg.scale_steps + (recover["lora_steps"] if recover["recover"] else 0)
    return (steps * cfg.batch_size * cfg.max_length
            + res["n_instructions"] * res["samples"] * (res["max_new_tokens"] + cfg.max_length)
            + cfg.on_policy * (cfg.on_policy_tokens + cfg.max_length))


def validate_request_options(options: dict | None) -> None:
    """An API request's `options`, names and values, without torch: PruneError for an unknown or
    server-only name, an unknown profile, a bad value (a 400 now, not a failed job later) or an
    oversized object."""
    if not options:
        return
    unknown = set(options) - OPTIONS - RECOVERY_OPTIONS | set(options) & SERVER_ONLY_OPTIONS
    if unknown:  # server-side paths and outbound URLs are not for API callers
        raise PruneError(f"unknown or not allowed options: {', '.join(sorted(unknown))}")
    if options.get("profile") not in (None, *PROFILES):
        *head, last = PROFILES
        raise PruneError(f"unknown profile {options['profile']!r}; choose {', '.join(head)} or {last}")
    check_options("persona-pruner", options)
    learn_config(resolve_options({k: x for k, x in options.items() if k not in RECOVERY_OPTIONS}))
    if len(json.dumps(options, default=str)) > MAX_REQUEST_OPTIONS_CHARS:
        raise PruneError("options too large")
