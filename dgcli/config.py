"""Model and sampler configuration, read from a checkpoint's config.json and generation_config.json.

`ModelConfig` is the text half of `DiffusionGemmaConfig` (transformers 5.23.0): the vision tower is not
used by dg. It accepts both forms of the per-layer attention shape: the released checkpoint's
`global_head_dim` / `num_global_key_value_heads`, and `per_layer_config` as `save_pretrained` writes it.
`SamplerSettings` holds the sampler knobs under the reference's names; precedence is
explicit argument > generation_config.json > the reference's built-in defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Bounds on the sampler's knobs (beyond them a value is a typo or an attack, never a setting):
# - temperatures: the logits are softcapped to |x| <= 30, so at T = 100 any two differ by < 0.6 after
#   the division and sampling is already near-uniform noise; more says nothing new (and inf is NaN).
# - denoising steps per block: the reference's default is 48 and a block stops once it is stable; one
#   that has not settled in 1024 steps will not, and the step count multiplies the time per block.
# - entropies (nats): no distribution over a vocabulary of < e^100 tokens has more than 100.
# - seeds: what a torch generator and JSON (int64) hold exactly; random seeds are drawn below it.
MAX_TEMPERATURE = 100.0
MAX_DENOISING_STEPS = 1024
MAX_STEPS_WHY = " (a block that has not settled in 1024 steps will not; the default is 48)"
MAX_ENTROPY_BOUND = 100.0
MAX_SEED = 2**63 - 1
# Bounds on a config.json's sizes, checked before anything is built from them (a crafted config must
# not make dg allocate or loop for ever). The released model: 30 layers, vocabulary 262,144 (2**18).
# The loader then checks the layer count and the embedding against the shard headers.
MAX_LAYERS = 1024
MAX_DIM = 2**20  # any one dimension: vocabulary, widths, heads, experts
MAX_POSITIONS = 2**24  # positions are exact in fp32 (RoPE) up to here
MAX_CANVAS = 8192  # a step holds canvas x vocabulary fp32 logits: 8 GB at the real vocabulary

SLIDING, FULL = "sliding_attention", "full_attention"
# Written last by `dg quantize`: its presence marks a whole quantized checkpoint. Kept here, torch-free,
# so that `dg list` tells quantized directories apart without importing the loader (and torch).
MANIFEST_FILE = "dg_manifest.json"

# Fields without which the architecture is unknowable: a config.json lacking one is refused rather
# than silently filled with a default that would only fail later as a shape mismatch.
REQUIRED_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int  # H
    intermediate_size: int  # dense MLP and self-conditioning MLP width
    num_hidden_layers: int
    num_attention_heads: int  # the same on every layer
    num_experts: int  # E
    top_k_experts: int  # experts per token
    moe_intermediate_size: int  # width of one routed expert
    layer_types: list[str]  # "sliding_attention" | "full_attention" per layer
    layer_head_dim: list[int]  # per layer: 256 sliding / 512 full on the real model
    layer_kv_heads: list[int]  # per layer: 8 sliding / 2 full on the real model
    sliding_window: int = 512  # W: a sliding query sees keys in (q-W, q]
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_ROPE)))
    final_logit_softcapping: float = 30.0  # a class attribute in the reference: never in config.json
    max_position_embeddings: int = 131_072
    hidden_activation: str = "gelu_pytorch_tanh"
    canvas_length: int = 256  # L: tokens per diffusion block
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    # Images (dgcli/vision.py): the tower's config.json section (None: a text-only checkpoint), the
    # placeholder id whose positions take the image features, and whether the encoder lets each
    # image's tokens attend to each other both ways (use_bidirectional_attention: "vision").
    vision_config: dict | None = None
    image_token_id: int | None = None
    bidirectional_vision: bool = False

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == SLIDING

    def kv_cache_bytes(self, context: int) -> dict:
        """What dgcli.cache.StaticKVCache allocates for `context` tokens, in bf16: K and V of every
        sliding layer as a ring of W-1+L slots, of every full layer as context+L slots, and the int64
        slot and canvas position maps. One formula for `dg show` and the planner's table."""
        L = self.canvas_length
        sliding = [i for i in range(self.num_hidden_layers) if self.is_sliding(i)]
        full = [i for i in range(self.num_hidden_layers) if not self.is_sliding(i)]
        ring, span = (self.sliding_window - 1 + L if sliding else 0), context + L

        def kv(layers, positions):
            return sum(2 * self.layer_kv_heads[i] * self.layer_head_dim[i] * 2 for i in layers) * positions

        parts = {"sliding": kv(sliding, ring), "full": kv(full, span), "maps": 8 * (ring + span + L),
                 "sliding_layers": len(sliding), "full_layers": len(full), "ring": ring, "span": span}
        parts["total"] = parts["sliding"] + parts["full"] + parts["maps"]
        return parts

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a config.json dict (top level with `text_config`, or a bare text config)."""
        top = d
        text = d.get("text_config", d)
        if not isinstance(text, dict):
            raise ConfigError("config.json: 'text_config' must be an object")
        missing = [k for k in REQUIRED_TEXT_FIELDS if text.get(k) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        for k in REQUIRED_TEXT_FIELDS:
            _check_int(k, text[k], MAX_LAYERS if k == "num_hidden_layers" else MAX_DIM)
        n = text["num_hidden_layers"]
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("config.json: use_bidirectional_attention='all' is not a DiffusionGemma text model")

        layer_types = text.get("layer_types")
        if layer_types is None:  # the reference's default: every 6th layer is full
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        if not isinstance(layer_types, (list, tuple)):
            raise ConfigError(f"config.json: 'layer_types' must be a list, got {layer_types!r}")
        layer_types = list(layer_types)
        if len(layer_types) != n:
            raise ConfigError(
                f"config.json: 'layer_types' has {len(layer_types)} entries but num_hidden_layers is {n}"
            )
        bad = sorted({t for t in layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"config.json: unknown entry in 'layer_types': {bad[0]!r}")
        layer_types[-1] = FULL  # the reference forces the last layer to full attention

        head_dim, kv_heads = text["head_dim"], text["num_key_value_heads"]
        layer_head_dim = [head_dim] * n
        layer_kv_heads = [kv_heads] * n
        per_layer = text.get("per_layer_config")
        if per_layer is not None:
            if "global_head_dim" in text or "num_global_key_value_heads" in text:
                raise ConfigError(
                    "config.json has both 'per_layer_config' and 'global_head_dim'/'num_global_key_value_heads'"
                )
            if not isinstance(per_layer, dict) or not all(isinstance(o, dict) for o in per_layer.values()):
                raise ConfigError("config.json: 'per_layer_config' must map layer indices to objects")
            for key, over in per_layer.items():
                try:
                    i = int(key)
                except ValueError:
                    raise ConfigError(f"config.json: per_layer_config key {key!r} is not a layer index") from None
                if not 0 <= i < n:
                    raise ConfigError(f"config.json: per_layer_config names layer {i}, but there are {n} layers")
                layer_head_dim[i] = over.get("head_dim", head_dim)
                layer_kv_heads[i] = over.get("num_key_value_heads", kv_heads)
        else:
            global_head_dim = text.get("global_head_dim", 512)
            global_kv = text.get("num_global_key_value_heads") or kv_heads
            for i, t in enumerate(layer_types):
                if t == FULL:
                    layer_head_dim[i], layer_kv_heads[i] = global_head_dim, global_kv
        for i, hd in enumerate(layer_head_dim):
            if not is_int(hd) or not 0 < hd <= MAX_DIM or hd % 2:
                raise ConfigError(f"config.json: layer {i} has head_dim {hd!r}; expected an even integer "
                                  f"from 2 to {MAX_DIM}")
        heads = text["num_attention_heads"]
        for i, kv in enumerate(layer_kv_heads):
            if not is_int(kv) or kv <= 0 or heads % kv:
                raise ConfigError(
                    f"config.json: layer {i} has {kv!r} key/value heads, which does not divide "
                    f"num_attention_heads={heads}"
                )
        if text["top_k_experts"] > text["num_experts"]:
            raise ConfigError(
                f"config.json: top_k_experts={text['top_k_experts']} exceeds num_experts={text['num_experts']}"
            )
        if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(f"config.json: hidden_activation {text['hidden_activation']!r} is not supported")

        rope = text.get("rope_parameters") or DEFAULT_ROPE
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: 'rope_parameters' must be an object, got {rope!r}")
        for t in set(layer_types):
            if not isinstance(rope.get(t), dict) or "rope_theta" not in rope[t]:
                raise ConfigError(f"config.json: rope_parameters has no 'rope_theta' for {t}")
            if rope[t].get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"config.json: rope_type {rope[t]['rope_type']!r} is not supported")
            _check_number(f"rope_parameters.{t}.rope_theta", rope[t]["rope_theta"], 1e12)
            if "partial_rotary_factor" in rope[t]:
                _check_number(f"rope_parameters.{t}.partial_rotary_factor", rope[t]["partial_rotary_factor"], 1.0)

        positions = _check_int("max_position_embeddings", text.get("max_position_embeddings", 131_072), MAX_POSITIONS)
        canvas = _check_int("canvas_length", top.get("canvas_length", 256) or 256, min(MAX_CANVAS, positions))
        window = _check_int("sliding_window", text.get("sliding_window", 512), positions)
        eps = _check_number("rms_norm_eps", text.get("rms_norm_eps", 1e-6), 1.0)
        ids = {}
        for k, default in (("pad_token_id", 0), ("bos_token_id", 2)):
            ids[k] = text.get(k, default)
            if ids[k] is not None:
                _check_int(k, ids[k], text["vocab_size"] - 1, low=0)
        try:
            eos = _id_list(top.get("eos_token_id", text.get("eos_token_id", 1)))
        except ConfigError as e:
            raise ConfigError(f"config.json: eos_token_id: {e}") from None
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_experts=text["num_experts"],
            top_k_experts=text["top_k_experts"],
            moe_intermediate_size=text["moe_intermediate_size"],
            layer_types=layer_types,
            layer_head_dim=layer_head_dim,
            layer_kv_heads=layer_kv_heads,
            sliding_window=window,
            rms_norm_eps=eps,
            rope_parameters=rope,
            max_position_embeddings=positions,
            canvas_length=canvas,
            pad_token_id=ids["pad_token_id"],
            bos_token_id=ids["bos_token_id"],
            eos_token_id=eos,
            vision_config=top.get("vision_config") if top is not text else None,
            image_token_id=top.get("image_token_id", 258_880) if top is not text else None,
            bidirectional_vision=text.get("use_bidirectional_attention") == "vision",
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path))


@dataclass
class SamplerSettings:
    """The reference's generation knobs (DiffusionGemmaGenerationConfig), with its global defaults."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def replace(self, **overrides) -> "SamplerSettings":
        """A copy with the given fields changed; None means "keep", unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown sampler setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        kept = {k: v for k, v in overrides.items() if v is not None}
        if "eos_token_id" in kept:
            kept["eos_token_id"] = _id_list(kept["eos_token_id"])
        out = dataclasses.replace(self, **kept)
        out.validate()
        return out

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"{name} {why}, got {getattr(self, name)!r}")

        def integer(name, low, high=None, why=""):
            v = getattr(self, name)
            if not is_int(v) or v < low or (high is not None and v > high):
                bad(name, f"must be an integer from {low} to {high}{why}" if high is not None
                    else f"must be an integer >= {low}")

        def number(name, low, high, low_open=True):
            v = getattr(self, name)
            ok = is_number(v) and math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
            if not ok:
                bad(name, f"must be a number {'>' if low_open else '>='} {low} and <= {high:g}")

        integer("max_new_tokens", 1)
        integer("max_denoising_steps", 1, MAX_DENOISING_STEPS, MAX_STEPS_WHY)
        number("entropy_bound", 0, MAX_ENTROPY_BOUND)
        number("t_min", 0, MAX_TEMPERATURE, low_open=False)
        number("t_max", 0, MAX_TEMPERATURE)
        if not self.t_max > self.t_min:
            bad("t_max", f"must be greater than t_min={self.t_min}")
        # It sizes a [k, canvas] history buffer, and a block stops within max_denoising_steps anyway.
        integer("stability_threshold", 0, MAX_DENOISING_STEPS,
                f" (the argmax must repeat that many steps; a block has at most {MAX_DENOISING_STEPS})")
        number("confidence_threshold", 0, MAX_ENTROPY_BOUND)
        if self.seed is not None:
            integer("seed", 0, MAX_SEED)
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(is_int(x) and x >= 0 for x in ids):
                bad(name, "must be a token id (an integer >= 0) or a list of them")

    @classmethod
    def from_generation_config(cls, d: dict) -> "SamplerSettings":
        """Defaults from a generation_config.json dict; null or absent fields keep the reference defaults."""
        s = cls()
        kw = {k: d.get(k) for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max",
                                    "stability_threshold", "confidence_threshold", "eos_token_id",
                                    "pad_token_id")}
        sampler = d.get("sampler_config")
        if isinstance(sampler, dict):
            kw["entropy_bound"] = sampler.get("entropy_bound")
        try:
            return s.replace(**kw)
        except ConfigError as e:
            raise ConfigError(f"generation_config.json: {e}") from None


def _check_int(name: str, v, high: int, low: int = 1) -> int:
    """A config.json integer in [low, high]; anything else (1e9 is a float in JSON, "512") is refused."""
    if not is_int(v) or not low <= v <= high:
        raise ConfigError(f"config.json: '{name}' must be an integer from {low} to {high}, got {v!r}")
    return v


def _check_number(name: str, v, high: float = float(MAX_DIM)) -> float:
    """A config.json number in (0, high], finite."""
    if not is_number(v) or not (math.isfinite(v) and 0 < v <= high):
        raise ConfigError(f"config.json: '{name}' must be a number > 0 and <= {high:g}, got {v!r}")
    return v


def is_int(v) -> bool:
    """An int that is not a bool (JSON's true would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _id_list(v) -> list[int] | None:
    """Token ids as a list; anything but integral numbers (a string, 1.5) is a ConfigError."""
    if v is None:
        return None
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    out = []
    for x in items:
        if is_number(x) and math.isfinite(x) and x == int(x) and x >= 0:
            out.append(int(x))
        else:
            raise ConfigError(f"token ids must be integers >= 0, got {v!r}")
    return out


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path.name} not found in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must contain a JSON object")
    return d


def temperature_shorthand(t: float) -> dict[str, float]:
    """`--temperature T` / `/set temperature T`: the schedule from T down to T/2."""
    return {"t_max": t, "t_min": t / 2}


# The settings a user tunes per generation (the CLI, chat's /set, the server), each with the type its
# text parses to: every field but the token ids (annotations are strings here: "int", "float", "int | None").
TUNABLE_SETTINGS = {f.name: float if "float" in f.type else int for f in dataclasses.fields(SamplerSettings)
                    if f.name not in ("eos_token_id", "pad_token_id")}
